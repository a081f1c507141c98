"""``snapshotd chaos``: a failure-injection harness with checked invariants.

scenarios.py (what a scenario says; the soak schedule; pure), invariants.py (the
judgement; pure), report.py (table and JSON; pure), rig.py (the cluster and the job as
processes), faults.py (bit flips, garbage, memory pressure), netns.py (partitions),
runner.py (one scenario from fault to verdict), cli.py (the command), trainer.py (the
stock data-parallel trainer, printing a state digest per step).
"""
