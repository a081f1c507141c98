"""``snapshotd chaos``: a failure-injection harness with checked invariants.

scenarios.py (what a scenario says; the soak schedule; pure), profile.py (the
trace-driven soak's schedule from a failure profile; pure), invariants.py (the
judgement; pure), report.py (table and JSON; pure), rig.py (the cluster and the job as
processes), faults.py (bit flips, garbage, memory pressure), netns.py (partitions),
runner.py (the session: one scenario from fault to verdict), crash.py / transient.py /
corrupt.py / pipeline.py (each shape of fault and its recovery), overlap.py (a second
fault during a recovery), curve.py (the session's memory curve), reference.py (the
failure-free digests), timeouts.py, cli.py (the command), trainer.py (the
stock data-parallel trainer, printing a state digest per step).
"""
