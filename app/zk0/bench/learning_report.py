"""`zk0 bench learning` over seeds: mean ± std per (arm, evaluation set), the issue's targets, the plot, the text.

A claimed difference between an arm and FedProx counts only when it is larger than the seeds' spread (the larger
standard deviation of the two arms); otherwise the comparison says "within noise".
"""

from __future__ import annotations

import math
import statistics

NODES = [f"node-{i}" for i in range(4)]
UNION, SERVER = "union-heldout", "server-eval"
COLUMNS = [*NODES, UNION, SERVER]
METRICS = ("policy_loss", "action_mse")
PERSONAL, LOCAL_OWN = "personalised", "local-own"  # rows scored on each node's own held-out set only
REFERENCE = "fedprox"  # what every other federated arm is compared with

DEFINITION = (
    "Same optimizer steps per model: every trained model copy takes rounds x local_steps AdamW steps of "
    "batch_size samples, in the federation's round structure (one warm-up+cosine LR schedule over all "
    "rounds, optimizer state restarted each round, batch seed = seed + 1000 x round). Each federated node "
    "does this per round before averaging; local-only is the same without averaging (mu = 0); centralized "
    "is one model on the union of the four nodes' training episodes (each batch from one node, drawn in "
    "proportion to its training frames), so it sees a quarter of the samples the four federated nodes see "
    "together. Normalisation: federated and centralized use the statistics merged from the nodes' training "
    "episodes, each local-only model its own node's, so policy_loss (in each model's normalised units) "
    "compares local-only with the rest less directly than action_mse (in the dataset's units). Every set is "
    "evaluated through its own camera map. The LoRA arms (ZK0_TRAINABLE=lora, LeRobot's SmolVLA targets, rank 8, "
    "alpha 8) train only adapters, at 10x the learning rate; fedprox-lora averages A and B (FedIT), "
    "fedprox-lora-ffa keeps A frozen and shared and averages B (FFA-LoRA). fedadam and fedavgm are Flower's "
    "server optimisers on the same mean (server rate 0.01; momentum 0.5), fedprox-adaptive moves mu by 0.01 per "
    "round with FedProx's loss rule (patience 1). personalised: in the fedprox run's last round each node "
    "fine-tunes the final global model for --personalize-steps steps on its own training episodes less a "
    "validation fifth (Ditto's proximal term, lambda 0.01), keeps whichever of the global model and the checkpoints "
    "after 1/3, 2/3 and all steps has the lowest loss on that validation part, and scores what it kept on its own "
    "held-out set (local-own: each local-only model there). "
    "Every arm runs once per seed; the seed also draws each node's held-out episodes."
)


def _spread(values: list[float]) -> dict:
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def summarise(seeds: list[dict]) -> dict:
    """{arm: {column: {metric: {mean, std, values}}}} over the seeds' results (rows missing a column skip it)."""
    arms = list(seeds[0]["results"])
    out = {}
    for arm in arms:
        cols = [c for c in COLUMNS if all(c in s["results"][arm] for s in seeds)]
        out[arm] = {c: {m: _spread([s["results"][arm][c][m] for s in seeds]) for m in METRICS} for c in cols}
    return out


def mean_row(rows: list[dict]) -> dict:
    """Plain mean of several models' metrics on each evaluation set."""
    return {
        col: {**{m: sum(r[col][m] for r in rows) / len(rows) for m in METRICS},
              "num-samples": rows[0][col]["num-samples"]}
        for col in COLUMNS
    }


def own_heldout_row(per_node: dict[str, dict]) -> dict:
    """A row of each node's model on its own held-out set only, and their sample-weighted mean (union)."""
    n = sum(per_node[name]["num-samples"] for name in NODES)
    union = {m: sum(per_node[k][m] * per_node[k]["num-samples"] for k in NODES) / n for m in METRICS}
    return {**{name: per_node[name] for name in NODES}, UNION: {**union, "num-samples": n}}


def personal_row(history: list[dict]) -> dict:
    """Each node's personal model on its own held-out set, as the node reported it in the last round."""
    found = {}
    for client in history[-1]["clients"].values():
        ev = client.get("eval") or {}
        if "personal_policy_loss" in ev:
            found[client["name"]] = {m: ev[f"personal_{m}"] for m in (*METRICS, "num-samples")}
    missing = [n for n in NODES if n not in found]
    if missing:
        raise RuntimeError(f"no personal model metrics from {missing} in the last round of the fedprox run")
    return own_heldout_row(found)


def personal_choices(history: list[dict]) -> dict:
    """Per node, what its personalisation kept (steps; 0 = the global model) and, for comparison, the own held-out
    figures of the model fine-tuned all the steps (what keeping it unconditionally would have given)."""
    out = {}
    for client in history[-1]["clients"].values():
        ev = client.get("eval") or {}
        if "personal_kept" in ev:
            out[client["name"]] = {"kept": int(ev["personal_kept"]), "steps": int(ev["personal_steps"]),
                                   **{f"tuned_{m}": float(ev.get(f"personal_tuned_{m}", math.nan)) for m in METRICS}}
    return out


def personal_lines(seeds: list[dict]) -> list[str]:
    """What each node's selection kept over the seeds, beside always fine-tuning all the steps."""
    per_seed = [s.get("personal_choices") or {} for s in seeds]
    if not any(per_seed):
        return []
    lines = ["personalised, selected on each node's own validation episodes (from its training episodes): "
             "personal model kept / seeds, steps chosen (0 = global); always fine-tuned, own held-out policy_loss:"]
    for node in NODES:
        got = [p[node] for p in per_seed if node in p]
        tuned = _spread([g["tuned_policy_loss"] for g in got]) if got else None
        lines.append(f"  {node}: kept {sum(g['kept'] for g in got)}/{len(got)}, steps {[g['steps'] for g in got]}; "
                     f"always fine-tuned {_cell(tuned)}")
    return lines


def compare(summary: dict, arm: str, column: str, metric: str) -> dict:
    """`arm` against FedProx on one set: relative difference and whether it exceeds the seeds' spread."""
    a, ref = summary[arm][column][metric], summary[REFERENCE][column][metric]
    diff, noise = a["mean"] - ref["mean"], max(a["std"], ref["std"])
    verdict = "within noise" if abs(diff) <= noise else ("better" if diff < 0 else "worse")
    return {"arm": arm, "column": column, "metric": metric, "difference": diff, "relative": diff / ref["mean"],
            "noise": noise, "verdict": verdict}


def _target(name: str, metric: str, margin: float, detail: str) -> dict:
    return {"target": name, "metric": metric, "passed": margin > 0, "margin": margin, "detail": detail}


def _mean(summary: dict, arm: str, column: str, metric: str) -> float:
    return summary[arm][column][metric]["mean"]


def targets(summary: dict, seeds: list[dict], federated: list[str], metric: str) -> list[dict]:
    """The issue's targets on seed means; margin is relative and positive when the target is met."""
    out = []
    for arm in federated:  # (a) on every seed: the worst later round of any seed against that seed's round 0
        margins = []
        for s in seeds:
            curve = [r[metric] for r in s["server_eval_history"][arm]]
            margins.append((curve[0] - max(curve[1:])) / curve[0])
        out.append(_target("(a) server eval below round 0 from round 1 on", metric, min(margins),
                           f"{arm}: smallest margin over {len(seeds)} seed(s)"))
    experts = [a for a in federated if "lora" not in a]
    best = min(experts, key=lambda a: _mean(summary, a, UNION, metric))
    fed, local, central = (_mean(summary, a, UNION, metric) for a in (best, "local-mean", "centralized"))
    out.append(_target("(b) federated beats mean local-only on union held-out", metric, (local - fed) / local,
                       f"{best} {fed:.5g} vs local-only mean {local:.5g}"))
    out.append(_target("(c) best federated arm at or below centralized on union held-out", metric,
                       (central - fed) / central,
                       f"{best} {fed:.5g} vs centralized {central:.5g} ({100 * (fed / central - 1):+.1f}%)"))
    full = _mean(summary, REFERENCE, UNION, metric)
    for arm in (a for a in federated if "lora" in a):
        lora = _mean(summary, arm, UNION, metric)
        out.append(_target(f"(d) {arm} within 5% of full-expert fedprox on union held-out", metric,
                           0.05 - (lora / full - 1),
                           f"{arm} {lora:.5g} vs fedprox {full:.5g} ({100 * (lora / full - 1):+.1f}%)"))
    if PERSONAL in summary:
        for node in NODES:
            mine = _mean(summary, PERSONAL, node, metric)
            for name, other in (("local-only", LOCAL_OWN), ("global", REFERENCE)):
                theirs = _mean(summary, other, node, metric)
                out.append(_target(f"(e) personalised below {name} on its own held-out", metric,
                                   (theirs - mine) / theirs,
                                   f"{node}: personalised {mine:.5g} vs {name} {theirs:.5g}"))
    return out


def plot(result: dict, path) -> None:
    """Server evaluation per round (mean over seeds, band = ±1 std) and each node's own held-out figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    seeds, summary = result["seeds"], result["summary"]
    fig, axes = plt.subplots(1, len(METRICS) + 1, figsize=(16, 4.5))
    for ax, metric in zip(axes, METRICS, strict=False):
        for arm in result["federated_arms"]:
            curves = np.array([[r[metric] for r in s["server_eval_history"][arm]] for s in seeds])
            rounds = [r["round"] for r in seeds[0]["server_eval_history"][arm]]
            mean, std = curves.mean(0), curves.std(0, ddof=1) if len(curves) > 1 else np.zeros(curves.shape[1])
            line, = ax.plot(rounds, mean, marker="o", label=arm)
            ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        # Local-only models normalise with their own node's statistics: their policy_loss is in other units.
        refs = (("centralized", ("k", "--")), ("local-mean", ("tab:red", ":")))[: 1 if metric == "policy_loss" else 2]
        for arm, style in refs:
            ax.axhline(_mean(summary, arm, SERVER, metric), color=style[0], ls=style[1], label=f"{arm} (final)")
        ax.set(xlabel="round", ylabel=metric, title=f"server evaluation: {metric} (±1 std, {len(seeds)} seeds)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    ax, width = axes[-1], 0.27
    rows = [a for a in (REFERENCE, LOCAL_OWN, PERSONAL) if a in summary]
    for k, arm in enumerate(rows):
        means = [_mean(summary, arm, n, "policy_loss") for n in NODES]
        stds = [summary[arm][n]["policy_loss"]["std"] for n in NODES]
        ax.bar(np.arange(len(NODES)) + (k - 1) * width, means, width, yerr=stds, capsize=3,
               label="fedprox global" if arm == REFERENCE else arm)
    ax.set_xticks(range(len(NODES)), NODES)
    ax.set(ylabel="policy_loss", title="each node's own held-out set")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cell(spread: dict | None) -> str:
    if spread is None or not math.isfinite(spread["mean"]):
        return "-"
    return f"{spread['mean']:.4g} ± {spread['std']:.2g}"


def report(result: dict) -> str:
    """The mean ± std tables, the comparisons with FedProx, the targets and the costs as plain text."""
    summary, lines = result["summary"], [result["definition"], ""]
    width = max(len(a) for a in summary) + 2
    for metric in METRICS:
        lines.append(f"{metric} (mean ± std over seeds {result['seed_values']})")
        lines.append(f"{'':<{width}}" + "".join(f"{c:>21}" for c in COLUMNS))
        for arm, row in summary.items():
            lines.append(f"{arm:<{width}}" + "".join(f"{_cell((row.get(c) or {}).get(metric)):>21}" for c in COLUMNS))
        lines.append("")
    lines += [*personal_lines(result["seeds"]), ""] if personal_lines(result["seeds"]) else []
    lines.append("against fedprox on union held-out (a difference counts only beyond the larger seed std):")
    for c in result["comparisons"]:
        change = f"{100 * c['relative']:+6.1f}% (std {c['noise']:.3g})"
        lines.append(f"  {c['arm']:<20} {c['metric']:<12} {change}: {c['verdict']}")
    lines.append("")
    lines.append("targets (on seed means; verdict on policy_loss, action_mse for reference):")
    for t in result["targets"]:
        verdict = "PASS" if t["passed"] else "MISS"
        lines.append(f"  {verdict} {t['target']} [{t['metric']}] margin {100 * t['margin']:+.1f}%: {t['detail']}")
    gaps = max(g for s in result["seeds"] for g in s["reproduction_gap"].values())
    lines.append(f"re-evaluation vs the federation's own final evals (max relative gap, arms and seeds): {gaps:.1e}")
    lines.append("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["timings_s"].items()))
    lines.append("load average (1 min) at start / end: " + " / ".join(f"{x:.1f}" for x in result["load_average"]))
    return "\n".join(lines)
