"""One JSON event per line on stdout, each line written whole.

Ranks that share one pipe (the forked ranks of ``gpt_trainer --nproc``, torchrun without
``--tee``, the demo's trainer groups) must each write a line with a single write(2).
``print(s, flush=True)`` writes the text and the newline separately when Python runs
unbuffered (``PYTHONUNBUFFERED=1``, common in containers and set by many launchers), and
another rank's line then lands between the two: ``{...}{...}\\n\\n`` instead of two lines.
A line shorter than PIPE_BUF (4096 bytes on Linux) written at once is never interleaved.
"""

from __future__ import annotations

import json
import sys


def emit(rec: dict) -> None:
    """Write ``rec`` as one JSON line to stdout in a single write, and flush."""
    sys.stdout.write(json.dumps(rec) + "\n")
    sys.stdout.flush()
