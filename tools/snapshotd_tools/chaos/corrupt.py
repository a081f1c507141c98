"""The corruption fault of ``snapshotd chaos``: a bit flipped in a held block.

The job is stopped, a bit is flipped in a held block (data or parity) of its newest
committed version, optionally followed by another node's loss (its rebuild reads the
block) or by nothing at all (the scrubber must find it). A restore must then refuse
the block (checksum) or decode around it; after the holder is replaced, the restore
is bit-exact. Driven by the Harness (``runner.py``) from its thread.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from snapshotd_tools.chaos import faults
from snapshotd_tools.chaos.invariants import Observation
from snapshotd_tools.chaos.report import Result
from snapshotd_tools.chaos.scenarios import Scenario, resolve_node
from snapshotd_tools.chaos.timeouts import PHASE_TIMEOUT_S, SCRUB_INTERVAL_S

if TYPE_CHECKING:
    from snapshotd_tools.chaos.runner import Harness


def run_corrupt(h: Harness, sc: Scenario, obs: Observation, res: Result) -> None:
    """Flip a bit in a held block of the newest committed version; a restore must refuse
    it or decode around it, and end bit-exact."""
    rig, g = h.rig, h.g
    node = resolve_node(sc.params["node"], h.n)
    # Stop the job, so that the version the bit is flipped in stays the newest.
    g.kill()
    h.drain(g)
    obs.fault_step = max(g.last.values())
    obs.committed_at_fault = h.trainer_committed()
    obs.daemon_committed = h.committed_now()
    h.wait_whole(max(obs.committed_at_fault, obs.daemon_committed))
    before = {n: rig.memory(n) for n in rig.nodes}
    t_fault = time.monotonic()
    replaced = []
    v = max(obs.committed_at_fault, obs.daemon_committed)  # the newest: the one flipped
    then = sc.params["then"]
    if sc.params["block"] == "data":
        res.fault = faults.flip_data_bit(rig, node, h.bs) + f" (v{v})"
    else:
        res.fault = faults.flip_parity_bits(rig, node, h.bs)
    if then == "rebuild":
        # Lose another node, whose rebuild reads the group's blocks (ours included).
        other = rig.nodes[(rig.nodes.index(node) + 1) % h.n]
        rig.kill_daemon(other)
        rig.restart(other, wipe=True)
        replaced.append(other)
        res.fault += f"; then {other} lost and replaced"
    elif then == "scrub":
        res.fault += "; nothing reads it"
    h.say(f"    fault: {res.fault}")
    obs.corrupted = res.fault  # corruption_detected: someone must report it
    if then == "scrub":
        _wait_scrubbed(h, node, v, t_fault)
    probe = h.launch("probe")
    obs.t_clear = probe.t_launch
    probe.wait(lambda: len(probe.restored) == h.n or any(rc != 0 for rc in probe.ended.values()),
               PHASE_TIMEOUT_S, "restore")
    if len(probe.restored) == h.n:
        # Restored without complaint: bit_identical decides whether that was right.
        found = _corrupt_found(h, node, v)
        res.detected = found or "not detected: the restore did not need the block"
        obs.corrupt_found += [found] if found else []
        obs.restore_points = dict(probe.restored)
        obs.final_step = min(h.steps, max(probe.restored.values()) + 2)
        probe.wait(lambda: min(probe.last.values()) >= obs.final_step or len(probe.ended) == h.n,
                   PHASE_TIMEOUT_S, f"training on to step {obs.final_step}")
        obs.resumed_to = dict(probe.last)
        reports = rig.corrupt_reports(version=v)
        fixed = [e for e in reports if e.get("repaired")]
        served = [e for e in reports if e.get("found_by") == "restore"]
        res.recovery = (f"{len(fixed)} block(s) repaired from the group; restored v{v}" if fixed else
                        f"the corrupt shard decoded from the group; restored v{v}" if served else
                        f"restored v{v} directly")
        res.recovery_s = round((probe.t_restored or time.monotonic()) - t_fault, 2)
    else:
        errs = probe.error_lines()  # before the launcher kills the rest (-9 is ours)
        probe.kill()
        h.drain(probe)
        why = [e for e in errs if "checksum" in e.lower() or "corrupt" in e.lower()]
        found = _corrupt_found(h, node, v)
        obs.corrupt_found += [f"trainer: {w}" for w in why] + ([found] if found else [])
        res.detected = (f"checksum: {why[0][:90]}" if why else found or f"restore failed: {errs[:1]}")
        obs.errors = errs
        h.say(f"    detected: {res.detected}; replacing {node}")
        # The operator's answer to a block that fails its checksum: replace its holder.
        rig.kill_daemon(node)
        rig.restart(node, wipe=True)
        replaced.append(node)
        h.wait_whole(v)
        g2 = h.resume("resumed", obs, obs.fault_step)
        res.recovery = f"restore refused; {node} replaced, rebuilt from peers, restored v{v}"
        res.recovery_s = round((g2.t_restored or time.monotonic()) - t_fault, 2)
    res.lost_steps = obs.fault_step - min(obs.restore_points.values(), default=0)
    h.settle(obs, before)

def _corrupt_found(h: Harness, node: str, v: int) -> str:
    """What the daemons reported of the corrupt blocks of ``node`` in version v."""
    found = [e for e in h.rig.corrupt_reports(version=v) if e.get("holder") == node]
    if not found:
        return ""
    kinds = sorted({e.get("kind", "?") for e in found})
    by = sorted({f"{e.get('reported_by')} ({e.get('found_by')})" for e in found})
    return (f"checksum: {len(found)} corrupt {'/'.join(kinds)} block report(s) on {node}, "
            f"by {', '.join(by)}")

def _wait_scrubbed(h: Harness, node: str, v: int, t_fault: float) -> None:
    """Nothing reads the block: the scrubber must find it and repair it, and the
    redundancy be whole again."""
    limit = SCRUB_INTERVAL_S * 2 + 20
    while time.monotonic() - t_fault < limit:
        found = [e for e in h.rig.corrupt_reports(version=v) if e.get("holder") == node]
        if found and all(e.get("repaired") for e in found) and h.rig.whole(v):
            h.say(f"    scrubber: {len(found)} block(s) found and repaired after "
                     f"{time.monotonic() - t_fault:.1f} s")
            return
        time.sleep(0.25)
    raise TimeoutError(f"the scrubber did not find and repair the corrupt block(s) of {node} "
                       f"within {limit:.0f} s (reports: {h.rig.corrupt_reports(version=v)[:3]})")
