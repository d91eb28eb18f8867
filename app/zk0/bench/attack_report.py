"""`zk0 bench attack`'s figures: each attack's change of the final server loss against the clean run, the
defences' cost on the clean run, the targets, the table and the plot."""

from __future__ import annotations

import argparse
import math
import statistics

from .report import table, target

DEFAULT = "bounded"  # the defences zk0 runs with unless told otherwise
MOVE_LIMIT = 5.0  # % change of the final server loss an attack may cause under the defaults (issue 25)
COST_LIMIT = 2.0  # % a defence may cost on the clean run (issue 25)


def _stats(values: list[float | None]) -> dict:
    """Mean and spread (sample std; 0 for one value) of finite values; failures (non-finite) counted apart, runs
    not made (None: a stopped benchmark's) left out."""
    values = [v for v in values if v is not None]
    good = [v for v in values if math.isfinite(v)]
    if not good:
        return {"mean": float("nan"), "std": float("nan"), "n": 0, "failed": len(values)}
    std = statistics.stdev(good) if len(good) > 1 else 0.0
    return {"mean": statistics.fmean(good), "std": std, "n": len(good), "failed": len(values) - len(good)}


def summarise(runs: list[dict], args: argparse.Namespace, load: list[float], seconds: float) -> dict:
    """Per (attack, defence): the loss's change in % of the clean run of that defence and seed; per defence: the
    clean run's change against the clean run without defences."""
    loss = {(r["seed"], r["defence"], r["attack"]): r["loss"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})

    def change(seed: int, defence: str, attack: str, reference: str) -> float | None:
        """% change of (defence, attack)'s loss against (reference, clean)'s; None when either was not run."""
        a, b = loss.get((seed, defence, attack)), loss.get((seed, reference, "clean"))
        return None if a is None or b is None else 100 * (a / b - 1)

    moved = {f"{a}|{d}": _stats([change(s, d, a, d) for s in seeds]) for a in args.attacks for d in args.defences}
    cost = {d: _stats([change(s, d, "clean", "none") for s in seeds]) for d in args.defences} \
        if "none" in args.defences else {}
    clean = {d: _stats([loss.get((s, d, "clean")) for s in seeds]) for d in args.defences}
    targets = []  # only for what was measured: a stopped benchmark's missing runs are "not run" in the table
    for attack in args.attacks if DEFAULT in args.defences else []:
        m = moved[f"{attack}|{DEFAULT}"]
        if m["n"] or m["failed"]:
            targets.append(target(f"{attack} under the default defences: |change of final server loss| (%)",
                                  abs(m["mean"]) if m["n"] else math.inf, MOVE_LIMIT, True, " %"))
    if cost.get(DEFAULT, {}).get("n"):
        targets.append(target("the default defences' cost on the clean run (%)", cost[DEFAULT]["mean"], COST_LIMIT,
                              True, " %"))
    return {
        "benchmark": "attack",
        "settings": {"smoke": args.smoke, "attacks": args.attacks, "defences": args.defences, "seeds": seeds,
                     "rounds": args.rounds, "local_steps": args.local_steps, "batch_size": args.batch_size,
                     "eval_batches": args.eval_batches, "labs": 4, "hostile": "node-1"},
        "runs": runs, "moved_pct": moved, "clean_cost_pct": cost, "clean_loss": clean, "targets": targets,
        "seconds": seconds, "load_average": load,
    }


def _cell(s: dict) -> str:
    if not s["n"]:
        return "failed" if s["failed"] else "not run"
    text = f"{s['mean']:+.1f} ± {s['std']:.1f}"
    return text + (f" ({s['failed']} failed)" if s["failed"] else "")


def report(result: dict) -> str:
    """The attack x defence table, the defences' cost, the targets and the timing, as plain text."""
    st = result["settings"]
    n = len(st["seeds"])
    lines = [f"== attack ({'smoke' if st['smoke'] else 'full run'}): {st['labs']} labs, {st['hostile']} hostile, "
             f"{st['rounds']} rounds of {st['local_steps']} steps, {n} seed(s)", "",
             f"change of the final server policy loss against the clean run of the same defence and seed, % "
             f"(mean ± std over {n} seed(s))",
             table(["attack", *st["defences"]],
                   [[a, *(_cell(result["moved_pct"][f"{a}|{d}"]) for d in st["defences"])] for a in st["attacks"]])]
    lines += ["", "clean runs: final server policy loss (mean ± std), and its change against no defence, %",
              table(["defence", "loss", "change %"],
                    [[d, f"{c['mean']:.4f} ± {c['std']:.4f}",
                      _cell(result["clean_cost_pct"][d]) if d in result["clean_cost_pct"] else "-"]
                     for d, c in result["clean_loss"].items()])]
    lines += ["", "targets:"]
    for t in result["targets"]:
        lines.append(f"  {'PASS' if t['passed'] else 'MISS'} {t['target']}: {t['value']:.4g} (target {t['limit']})")
    load = result["load_average"]
    lines.append(f"took {result['seconds'] / 60:.1f} min for {len(result['runs'])} federations; 1-min load "
                 f"{load[0]:.1f} at start, {load[-1]:.1f} at end")
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    """Grouped bars: each attack's change of the final server loss per defence (±1 std), symlog axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    st = result["settings"]
    attacks, defences = st["attacks"], st["defences"]
    width = 0.8 / len(defences)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(attacks)), 4.5))
    for k, d in enumerate(defences):
        cells = [result["moved_pct"][f"{a}|{d}"] for a in attacks]
        ax.bar(np.arange(len(attacks)) + (k - (len(defences) - 1) / 2) * width, [c["mean"] for c in cells], width,
               yerr=[c["std"] for c in cells], capsize=2, label=d)
    ax.axhspan(-MOVE_LIMIT, MOVE_LIMIT, color="g", alpha=0.12, label=f"±{MOVE_LIMIT:g} % (target, defaults)")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xticks(np.arange(len(attacks)), attacks)
    ax.set(ylabel="final server loss vs clean run (%)",
           title=f"one hostile lab of 4, {st['rounds']} rounds, {len(st['seeds'])} seed(s) (±1 std)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
