"""Ranks sharing one stdout pipe write whole JSON lines (snapshotd_tools.demo.events).

Found by a loaded full-suite run with ``PYTHONUNBUFFERED=1`` in the environment:
``test_gpt_resume`` read ``{"event": "done", ...}{"event": "iter", ...}`` as one line,
because ``print(s, flush=True)`` writes the text and the newline separately when Python
runs unbuffered, and rank 0's line landed between rank 1's two writes. Here two forked
processes write many lines each into one pipe, unbuffered, through ``events.emit``;
every line must parse and none may be lost. (With ``print`` instead, 76 of 6,000 lines
were broken on this machine.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import os, sys
from snapshotd_tools.demo.events import emit
pids = []
for r in range(2):
    pid = os.fork()
    if pid == 0:
        for i in range(int(sys.argv[1])):
            emit({"rank": r, "i": i, "pad": "x" * 100})
        os._exit(0)
    pids.append(pid)
for p in pids:
    os.waitpid(p, 0)
"""


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_forked_ranks_sharing_a_pipe_write_whole_lines(unbuffered):
    n = 3000
    env = dict(os.environ, PYTHONUNBUFFERED=unbuffered)
    if not unbuffered:
        env.pop("PYTHONUNBUFFERED")
    out = subprocess.run([sys.executable, "-c", CHILD, str(n)], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    lines = out.splitlines()
    broken = [ln for ln in lines if not ln.startswith("{") or not ln.endswith("}")]
    assert not broken, f"{len(broken)} broken lines, e.g. {broken[:2]}"
    got = sorted((e["rank"], e["i"]) for e in map(json.loads, lines))
    assert got == sorted((r, i) for r in range(2) for i in range(n))
