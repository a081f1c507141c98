"""Time limits of ``snapshotd chaos`` (shared by the Harness and the fault modules)."""

PHASE_TIMEOUT_S = 120.0
REBUILD_TIMEOUT_S = 60.0
GLOO_TIMEOUT_S = 10.0  # longer than any transient fault, or the job would not run through it
# The daemons' scrub interval (their default is 600 s): short enough that a 'then: scrub'
# fault is found within a scenario, long enough that it rarely beats a restore to a block.
SCRUB_INTERVAL_S = 10.0
