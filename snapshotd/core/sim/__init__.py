"""A pure, seeded, discrete-event failure simulator for sizing snapshotd (issue 17).

* :mod:`.profiles` -- failure profiles (``llama3``, ``rsc``, ``custom``) and
  :func:`~.profiles.fault_kinds` for fault injectors;
* :mod:`.model` -- the job, the strategies (snapshotd, replication, disk checkpoints,
  CheckFree) and what each costs (:func:`~.model.costs`, :func:`~.model.young_daly`);
* :mod:`.recover` -- whether a set of lost nodes is recoverable, asked of the real
  planners (placement, recovery, CheckFree);
* :mod:`.engine` -- fault traces and the simulation (ETTR, lost work, memory losses);
* :mod:`.analysis` -- interval sweeps, loss probabilities (Monte-Carlo and binomial) and
  the sizing advice ``snapshotd plan`` prints;
* :mod:`.commitcount` -- messages and bytes per node per committed version, counted by
  driving :class:`snapshotd.core.protocol.JobProtocol`.

Nothing here reads a clock, a file or the OS's randomness: every run is reproducible
from its seed.
"""
