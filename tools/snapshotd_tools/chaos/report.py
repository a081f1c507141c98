"""Scenario results: the table printed at the end and the JSON report. Pure."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from snapshotd_tools.chaos.invariants import Check


@dataclass
class Result:
    scenario: str
    fault: str  # what was done, in words
    detected: str = "-"  # what noticed it, and after how long
    recovery: str = "-"  # the recovery path taken
    recovery_s: float | None = None  # fault -> every rank restored (or the error seen)
    lost_steps: int | None = None
    checks: list = field(default_factory=list)  # Check
    overlap: str = ""  # the second fault, injected during this one's recovery
    error: str = ""  # the harness itself failed (counts as a failed invariant)
    seconds: float = 0.0
    params: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.checks) and all(c.ok for c in self.checks)

    def failed(self) -> list[Check]:
        out = [c for c in self.checks if not c.ok]
        if self.error:
            out.append(Check("harness", False, self.error))
        return out


def format_table(results: list[Result]) -> str:
    cols = [("scenario", 30), ("fault", 38), ("detected", 30), ("recovery path", 34),
            ("recovery", 8), ("lost", 4), ("invariants", 10)]
    lines = ["  ".join(f"{h:{w}}" for h, w in cols), "  ".join("-" * w for _, w in cols)]
    for r in results:
        row = [r.scenario, r.fault, r.detected, r.recovery,
               "-" if r.recovery_s is None else f"{r.recovery_s:.1f}s",
               "-" if r.lost_steps is None else str(r.lost_steps),
               "held" if r.ok else "FAILED"]
        lines.append("  ".join(_cut(v, w) for v, (_, w) in zip(row, cols)))
    bad = [(r, c) for r in results for c in r.failed()]
    if bad:
        lines.append("")
        lines.append("violated:")
        lines += [f"  {r.scenario}: {c.name}: {c.detail}" for r, c in bad]
    ok = sum(r.ok for r in results)
    lines.append("")
    lines.append(f"{ok}/{len(results)} scenarios held every invariant")
    return "\n".join(lines)


def _cut(v: str, w: int) -> str:
    v = str(v)
    return f"{v:{w}}" if len(v) <= w else v[:w - 1] + "~"


def to_json(results: list[Result], meta: dict) -> dict:
    return {"meta": meta, "ok": all(r.ok for r in results),
            "summary": summarize(results),
            "scenarios": [dict(asdict(r), ok=r.ok) for r in results]}


def summarize(results: list[Result]) -> dict:
    by_kind: dict[str, dict] = {}
    for r in results:
        k = by_kind.setdefault(r.params.get("kind", "?"), {"runs": 0, "held": 0})
        k["runs"] += 1
        k["held"] += r.ok
    rec = [r.recovery_s for r in results if r.recovery_s is not None]
    lost = [r.lost_steps for r in results if r.lost_steps is not None]
    return {"scenarios": len(results), "held": sum(r.ok for r in results),
            "failed": [r.scenario for r in results if not r.ok], "by_kind": by_kind,
            "recovery_s_max": max(rec) if rec else None,
            "recovery_s_mean": round(sum(rec) / len(rec), 2) if rec else None,
            "lost_steps_max": max(lost) if lost else None}


def write_json(path: str, results: list[Result], meta: dict) -> None:
    import os

    with open(path + ".tmp", "w") as f:
        json.dump(to_json(results, meta), f, indent=2)
    os.replace(path + ".tmp", path)
