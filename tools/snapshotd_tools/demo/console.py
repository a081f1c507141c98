"""Console output of ``snapshotd demo``: the ``[demo]`` prefix and a few formats."""

from __future__ import annotations


def say(msg: str = "") -> None:
    print(f"[demo] {msg}", flush=True)


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def tail(path: str, n: int = 1) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [x.strip() for x in f.read().splitlines() if x.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def indent(text: str) -> None:
    for line in text.splitlines():
        say(f"      {line}")
