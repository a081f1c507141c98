"""CheckFree vs. the alternatives: how fast does training get back after a lost pipeline stage?

Trains the pipeline example (``snapshotd_tools.demo.pp_trainer``: --stages transformer stages,
CheckFree+ schedule, i.e. the first two and last two stages swap order on odd
micro-batches and the swap partners keep copies of the embedding / head) and loses one
stage at step --fail-at. In ONE run, from the same state at the failure, it compares:

* ``no failure``                   -- the reference;
* ``CheckFree (stage m lost)``     -- middle stage m = 1 rebuilt as the grad-norm weighted
                                      average of stages 0 and 2;
* ``CheckFree+ (stage 0 lost)``    -- the first stage (with the embedding) rebuilt as a copy
                                      of stage 1 and its embedding copy;
* ``restart from N steps older``   -- every stage goes back to its state of step
                                      fail_at - N (a snapshot taken every N steps, lost at
                                      the worst moment) and redoes those N steps;
* ``random re-init (stage m lost)``-- stage m re-initialised at random, fresh optimizer;
* ``no failure, natural order``    -- reference without the CheckFree+ swaps (what the swaps
                                      cost), not part of the recovery figures.

The rebuilt stages get a fresh optimizer, lr x --lr-scale, the schedule resumes at the
failure step (no warm-up restart).

For each failure strategy it reports the number of steps after the failure until the
loss is back within 5% of the failure-free loss at the same step and stays there for
--hold steps (or to the end), measured two ways:

* training loss, smoothed: a trailing mean over --smooth steps that never reaches back
  before the failure (the first post-failure values are averaged over fewer steps),
  applied to both curves. Both see the same batches at the same step, except the
  restart, which replays older batches (so its ratio carries batch noise);
* held-out loss: --eval-batches fixed batches, evaluated every --eval-every steps with
  the stages in their natural order; no smoothing needed, same data for every curve.

It also reports the peak smoothed ratio and the mean excess training loss over the rest
of the run. Runs --seeds seeds (different initialisation and data); the plot shows the
first. The default failure step (100 of 500) falls while the loss is still falling fast:
the example converges near its noise floor (about 1.1) by step ~200, after which every
strategy looks alike.

How the stages are run: the whole pipeline is simulated in this one process
(``pp_trainer.train_step_local``: same model, data, stage order, clipping and optimizer
as the distributed trainer, but no gloo and no daemons), so it runs in a few minutes on
two cores. The rebuild takes the real restore's code path from the planner on:
``pipeline.stage_meta`` -> ``stage_info_from_meta`` -> ``checkfree.plan_checkfree`` ->
``checkfree_restore.apply_checkfree`` (``apply_rebuild`` + the optimizer / LR reset); only
reading the neighbours' shards from the daemons is left out (the tests cover that).

    python -m bench.bench_checkfree [--stages 4] [--steps 500] [--fail-at 100] [--older 50]
        [--microbatches 2] [--seeds 3] [--smooth 20] [--hold 50] [--lr-scale 1.1]
        [--eval-every 5] [--eval-batches 4] [--json out.json] [--png out.png] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

try:
    from snapshotd.core.checkfree import CheckFreePlan, CheckFreeSettings, plan_checkfree
except ImportError:  # run as `python bench/bench_checkfree.py` from anywhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from snapshotd.core.checkfree import CheckFreePlan, CheckFreeSettings, plan_checkfree
from snapshotd_tools.demo import pp_trainer as pp
from snapshotd_client.checkfree_restore import apply_checkfree, reset_optimizer
from snapshotd_client.pipeline import stage_info_from_meta, stage_meta

BASE = "no failure"
NATURAL = "no failure, natural order"
TOLERANCE = 1.05


class Pipe:
    """All stages of the pipeline in one process, with their optimizers and schedules."""

    def __init__(self, S: int, seed: int, plus: bool):
        self.S, self.seed, self.plus = S, seed, plus
        built = [pp.build(i, S, seed, plus) for i in range(S)]
        self.stages, self.opts, self.scheds = (list(x) for x in zip(*built))
        self.norms = [None] * S
        if plus:
            pp.sync_edge_copies(self.stages)

    def step(self, step: int, microbatches: int) -> float:
        loss, self.norms = pp.train_step_local(self.stages, self.opts, self.scheds, self.seed, step,
                                               microbatches, self.plus)
        return loss

    @torch.no_grad()
    def eval_loss(self, batches) -> float:
        """Mean loss on fixed held-out batches, stages in their natural order (inference)."""
        total = 0.0
        for x, y in batches:
            h = self.stages[0].embed(x)
            for st in self.stages:
                h = st.run_block(h)
            total += float(torch.nn.functional.cross_entropy(self.stages[-1].head(h).reshape(-1, pp.VOCAB),
                                                             y.reshape(-1)))
        return total / len(batches)

    def state(self) -> list:
        clone = lambda sd: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in sd.items()}  # noqa: E731
        return [(clone(s.state_dict()), _deep(o.state_dict()), dict(sc.state_dict()))
                for s, o, sc in zip(self.stages, self.opts, self.scheds)] + [list(self.norms)]

    @classmethod
    def from_state(cls, S: int, seed: int, plus: bool, state: list) -> "Pipe":
        p = cls(S, seed, plus)
        for (sd, osd, ssd), s, o, sc in zip(state[:-1], p.stages, p.opts, p.scheds):
            s.load_state_dict(sd)
            o.load_state_dict(_deep(osd))
            sc.load_state_dict(ssd)
        p.norms = list(state[-1])
        return p


def _deep(x):
    if torch.is_tensor(x):
        return x.clone()
    if isinstance(x, dict):
        return {k: _deep(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deep(v) for v in x]
    return x


def _info(p: Pipe, j: int):
    s = p.stages[j]
    return stage_info_from_meta(stage_meta(s, j, p.S, p.norms[j], s.edge_copies, s.edge_layers))


def lose_stage(p: Pipe, lost: int, step: int, how: str, settings: CheckFreeSettings, seed_salt: int) -> str:
    """Replace stage ``lost`` of ``p`` by a freshly built one (its state is gone), then
    rebuild it by CheckFree / CheckFree+ (``how="checkfree"``: the restore's planner and
    apply code) or leave it at random (``how="random"``). Returns the plan's note."""
    stage, opt, sched = pp.build(lost, p.S, p.seed + seed_salt, p.plus)
    if how == "checkfree":
        infos = {j: _info(p, j) for j in range(p.S) if j != lost}
        own = stage_info_from_meta(stage_meta(stage, lost, p.S, None, stage.edge_copies, stage.edge_layers))
        plan = plan_checkfree(infos, {lost}, settings, lost_info={lost: own})
        if not isinstance(plan, CheckFreePlan):
            raise RuntimeError(f"CheckFree cannot rebuild stage {lost}: {plan.reason}")
        (rb,) = plan.rebuilds
        tensors = {j: [t.detach().clone() for t in p.stages[j].parameters()] for j, _ in rb.sources}
        for e in rb.edge_pairs:
            tensors.setdefault(e.source_stage, [t.detach().clone() for t in p.stages[e.source_stage].parameters()])
        apply_checkfree(stage, opt, sched, rb, tensors, settings, step)
        note = rb.note
    else:
        reset_optimizer(opt, sched, CheckFreeSettings(lr_scale=1.0), step)  # schedule at the step
        note = f"stage {lost} re-initialised at random, fresh optimizer"
    p.stages[lost], p.opts[lost], p.scheds[lost] = stage, opt, sched
    if p.plus:
        pp.sync_edge_copies(p.stages)
    return note


def smooth_after(xs: list[float], start: int, w: int) -> list[float]:
    """Trailing mean over ``w`` values that never reaches back before index ``start``."""
    out = []
    for t in range(start, len(xs)):
        lo = max(start, t - w + 1)
        out.append(sum(xs[lo:t + 1]) / (t + 1 - lo))
    return out


def recovery(base: list[float], var: list[float], fail_at: int, w: int, hold: int) -> dict:
    sb, sv = smooth_after(base, fail_at, w), smooth_after(var, fail_at, w)
    ratio = [v / b for v, b in zip(sv, sb)]
    ok = [r <= TOLERANCE for r in ratio]
    steps = None
    for d in range(len(ok)):
        if all(ok[d:d + hold]):
            steps = d
            break
    excess = [v - b for v, b in zip(var[fail_at:], base[fail_at:])]
    return {"steps_to_5pct": steps, "peak_ratio": max(ratio), "ratio_at_fail": ratio[0],
            "mean_excess_loss": sum(excess) / len(excess), "smoothed_ratio": ratio}


def run_seed(a, seed: int, log) -> dict:
    S, F, T, M, E = a.stages, a.fail_at, a.steps, a.microbatches, a.eval_every
    settings = CheckFreeSettings(lr_scale=a.lr_scale, checkfree_plus=True)
    held_out = [pp.batch(10**6 + seed, k) for k in range(a.eval_batches)]
    mid = 1
    t0 = time.perf_counter()

    def train(p: Pipe, wall: range, offset: int, losses: list, evals: dict) -> None:
        """Train ``p`` over wall-clock steps ``wall`` (its own step = wall step - offset)."""
        for t in wall:
            if t % E == 0:
                evals[t] = p.eval_loss(held_out)
            losses.append(p.step(t - offset, M))

    base, losses, evals, notes, older = Pipe(S, seed, True), {BASE: []}, {BASE: {}}, {}, None
    for t in range(F):
        if t == F - a.older:
            older = base.state()
        train(base, range(t, t + 1), 0, losses[BASE], evals[BASE])
    at_fail = base.state()
    log(f"  seed {seed}: trained to the failure at step {F} ({time.perf_counter() - t0:.1f} s, "
        f"loss {losses[BASE][-1]:.3f})")
    variants = {}
    for name, how, lost in ((f"CheckFree (stage {mid} lost)", "checkfree", mid),
                            ("CheckFree+ (stage 0 lost)", "checkfree", 0),
                            (f"random re-init (stage {mid} lost)", "random", mid)):
        p = Pipe.from_state(S, seed, True, at_fail)
        notes[name] = lose_stage(p, lost, F, how, settings, seed_salt=7919)
        variants[name] = (p, 0)
    variants[f"restart from {a.older} steps older"] = (Pipe.from_state(S, seed, True, older), a.older)
    for name, (p, offset) in variants.items():
        t1 = time.perf_counter()
        losses[name], evals[name] = losses[BASE][:F], {t: v for t, v in evals[BASE].items() if t < F}
        train(p, range(F, T), offset, losses[name], evals[name])
        log(f"  seed {seed}: {name}: {T - F} steps after the failure ({time.perf_counter() - t1:.1f} s)")
    train(base, range(F, T), 0, losses[BASE], evals[BASE])
    nat = Pipe(S, seed, False)
    losses[NATURAL], evals[NATURAL] = [], {}
    train(nat, range(T), 0, losses[NATURAL], evals[NATURAL])
    rec = {name: {**recovery(losses[BASE], ls, F, a.smooth, a.hold),
                  "eval_steps_to_5pct": eval_recovery(evals[BASE], evals[name], F, a.hold)}
           for name, ls in losses.items() if name not in (BASE, NATURAL)}
    log(f"  seed {seed}: all variants in {time.perf_counter() - t0:.1f} s")
    return {"seed": seed, "losses": losses, "evals": {n: sorted(e.items()) for n, e in evals.items()},
            "recovery": rec, "notes": notes}


def eval_recovery(base: dict, var: dict, fail_at: int, hold: int) -> int | None:
    """Steps after the failure until the held-out loss is within 5% of no failure's at the
    same step, at every evaluation of the next ``hold`` steps."""
    pts = sorted(t for t in var if t >= fail_at)
    ok = {t: var[t] <= TOLERANCE * base[t] for t in pts}
    for t in pts:
        if all(ok[u] for u in pts if t <= u < t + hold):
            return t - fail_at
    return None


def plot(path: str, a, res: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    F, w = a.fail_at, a.smooth
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 8), gridspec_kw={"height_ratios": [3, 2]})
    styles = {BASE: ("black", "-", 2.0), NATURAL: ("grey", ":", 1.2)}
    colours = iter(["tab:blue", "tab:green", "tab:red", "tab:orange", "tab:purple"])
    for name, ls in res["losses"].items():
        c, st, lw = styles[name] if name in styles else (next(colours), "-", 1.4)
        sm = smooth_after(ls, 0, w)[:F] + smooth_after(ls, F, w)
        r = res["recovery"].get(name)
        label = name if r is None else (f"{name}: back within 5% after "
                                        f"{r['steps_to_5pct'] if r['steps_to_5pct'] is not None else 'never'} steps")
        ax.plot(range(1, len(ls) + 1), sm, color=c, linestyle=st, linewidth=lw, label=label)
        if r is not None:
            ax2.plot(range(F + 1, len(ls) + 1), r["smoothed_ratio"], color=c, linewidth=1.4, label=name)
    for x in (ax, ax2):
        x.axvline(F, color="k", linestyle="--", linewidth=0.8)
    ax.set_ylabel(f"training loss (trailing mean of {w} steps)")
    ax.set_title(f"Pipeline of {a.stages} stages, a stage lost at step {F} (seed {res['seed']})")
    ax.legend(fontsize=8)
    ax2.axhline(TOLERANCE, color="k", linewidth=0.8, linestyle=":")
    ax2.set_ylabel("smoothed loss / no-failure loss")
    ax2.set_xlabel("training step")
    ax2.set_xlim(F - 10, min(a.steps, F + max(200, a.steps // 3)))
    ax2.set_ylim(0.9, min(3.0, max(1.3, max(max(r["smoothed_ratio"][:50]) for r in res["recovery"].values()) + 0.05)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, default=4, help="pipeline stages (>= 3; default 4)")
    p.add_argument("--steps", type=int, default=500, help="training steps (default 500)")
    p.add_argument("--fail-at", type=int, default=100, help="the step at which a stage is lost (default 100)")
    p.add_argument("--older", type=int, default=50, help="the restart's snapshot is this many steps older (50)")
    p.add_argument("--microbatches", type=int, default=2, help="micro-batches per step (default 2)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    p.add_argument("--seed", type=int, default=7, help="first seed (default 7)")
    p.add_argument("--smooth", type=int, default=20, help="trailing-mean window in steps (default 20)")
    p.add_argument("--hold", type=int, default=50, help="steps the loss must stay within 5%% (default 50)")
    p.add_argument("--lr-scale", type=float, default=1.1, help="LR multiplier of a rebuilt stage (1.1)")
    p.add_argument("--eval-every", type=int, default=5, help="held-out loss every this many steps (5)")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches (default 4)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--png", default=None, help="write the plot here")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny sizes (40 steps, failure at 20, "
                                                          "restart 5 steps back, 1 seed)")
    a = p.parse_args(argv)
    if a.quick:
        quick = dict(steps=40, fail_at=20, older=5, seeds=1, smooth=4, hold=5, eval_every=2)
        for k, v in quick.items():  # tiny sizes, except where given on the command line
            if getattr(a, k) == p.get_default(k):
                setattr(a, k, v)
    if a.stages < 3 or not 0 < a.older <= a.fail_at < a.steps or min(a.microbatches, a.seeds, a.smooth, a.hold,
                                                                                  a.eval_every, a.eval_batches) < 1:
        p.error("need --stages >= 3, 0 < --older <= --fail-at < --steps, and positive counts")
    if not 1.0 <= a.lr_scale <= 2.0:
        p.error("--lr-scale must be in [1.0, 2.0]")
    torch.set_num_threads(1)
    say = lambda s: print(s, flush=True)  # noqa: E731
    say(f"[bench_checkfree] {a.stages} stages, {a.steps} steps, stage lost at step {a.fail_at}, "
        f"{a.microbatches} micro-batches per step, seeds {a.seed}..{a.seed + a.seeds - 1}")
    t0 = time.perf_counter()
    runs = [run_seed(a, a.seed + k, say) for k in range(a.seeds)]
    names = list(runs[0]["recovery"])
    summary = {}
    say(f"\nsteps after the failure until the loss is back within 5% of no failure at the same step "
        f"(and stays there {a.hold} steps): training loss as a trailing mean of {a.smooth} steps, and the "
        f"loss on {a.eval_batches} held-out batches every {a.eval_every} steps")
    say(f"{'strategy':36s} {'per seed':>16s} {'median':>7s} {'held-out':>16s} {'median':>7s} "
        f"{'peak ratio':>10s} {'excess loss':>11s}")

    def med_of(xs):
        return statistics.median(xs) if all(x is not None for x in xs) else None

    def fmt(x):
        return "never" if x is None else f"{x:g}"

    for name in names:
        steps = [r["recovery"][name]["steps_to_5pct"] for r in runs]
        ev = [r["recovery"][name]["eval_steps_to_5pct"] for r in runs]
        peak = statistics.median(r["recovery"][name]["peak_ratio"] for r in runs)
        exc = statistics.median(r["recovery"][name]["mean_excess_loss"] for r in runs)
        summary[name] = {"steps_to_5pct": steps, "median_steps_to_5pct": med_of(steps),
                         "eval_steps_to_5pct": ev, "median_eval_steps_to_5pct": med_of(ev),
                         "median_peak_ratio": peak, "median_mean_excess_loss": exc}
        say(f"{name:36s} {','.join(map(fmt, steps)):>16s} {fmt(med_of(steps)):>7s} {','.join(map(fmt, ev)):>16s} "
            f"{fmt(med_of(ev)):>7s} {peak:10.3f} {exc:11.4f}")
    cost = [statistics.mean(r["losses"][NATURAL][-a.smooth:]) / statistics.mean(r["losses"][BASE][-a.smooth:])
            for r in runs]
    say(f"final loss without the CheckFree+ swaps / with them: {', '.join(f'{c:.3f}' for c in cost)}")
    elapsed = time.perf_counter() - t0
    say(f"total {elapsed:.1f} s")
    doc = {"config": {k: v for k, v in vars(a).items() if k not in ("json", "png")}, "tolerance": TOLERANCE,
           "smoothing": f"trailing mean of {a.smooth} steps, not reaching back before the failure",
           "simulated_in_one_process": True, "summary": summary, "natural_over_swapped_final_loss": cost,
           "notes": runs[0]["notes"], "elapsed_s": elapsed, "machine": platform.platform(),
           "torch": torch.__version__,
           "runs": [{"seed": r["seed"], "losses": r["losses"], "held_out": r["evals"],
                     "recovery": {n: {k: v for k, v in x.items() if k != "smoothed_ratio"}
                                  for n, x in r["recovery"].items()}} for r in runs]}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
        say(f"results: {a.json}")
    if a.png:
        say(f"plot: {a.png}" if plot(a.png, a, runs[0]) else "(matplotlib not installed: no plot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
