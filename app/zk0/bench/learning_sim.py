"""`zk0 bench learning --sim`: every model the benchmark trains, also scored by how often it makes the simulated
SO-101 arm succeed at each lab's task (zk0.sim), beside its offline losses; and how well those losses rank the
models against success (Spearman's rank correlation)."""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

from .learning_report import NODES, PERSONAL, REFERENCE, UNION, _cell, _spread

log = logging.getLogger("zk0")
ALL, OWN = "all", "own-task"
SIMPLEST = "lift-top"  # fixed target, two cameras at 10 fps: the task the signal must show on first


def with_sim(score, labs: list, episodes: int, seed: int):
    """The benchmark's offline scorer, plus success per lab (through the same processors and statistics)."""
    from ..sim.evaluate import evaluate_labs

    def scored(policy, path: str, stats):
        row = score(policy, path, stats)
        row["sim"] = evaluate_labs(policy, path, stats, labs, episodes, seed)
        return row

    return scored


def personal_sim(node_dirs: dict, labs: list, episodes: int, seed: int, device: str) -> dict:
    """Each node's kept personal model (or the global one it kept instead) on its own lab's task only."""
    from ..model import load_policy
    from ..sim.evaluate import evaluate_labs

    out = {}
    for node, lab in zip(NODES, labs, strict=True):
        saved = sorted(Path(node_dirs[node]).glob("round-*/config.json"))
        if not saved:  # too few episodes to personalise: the node kept nothing
            log.warning("%s: no personal model in %s; left out of the personalised row", node, node_dirs[node])
            continue
        path = str(saved[-1].parent)
        out[node] = evaluate_labs(load_policy(path, device), path, None, [lab], episodes, seed)[lab.name]
    return out


def seed_table(rows: dict, personal: dict | None, labs: list) -> dict:
    """{model: {lab: success rate, all: pooled, own-task: mean over nodes on their own lab}} for one seed."""
    names = [lab.name for lab in labs]
    table = {m: {k: r["sim"][k]["success_rate"] for k in [*names, ALL]} for m, r in rows.items() if "sim" in r}
    local = [table[f"local-{n}"] for n in NODES]
    table["local-mean"] = {k: statistics.fmean(t[k] for t in local) for k in [*names, ALL]}
    own = {n: local[i][names[i]] for i, n in enumerate(NODES)}
    table["local-own"] = {**own, OWN: statistics.fmean(own.values())}
    if personal:
        mine = {n: personal[n]["success_rate"] for n in NODES if n in personal}
        table[PERSONAL] = {**mine, OWN: statistics.fmean(mine.values())}
    for model in [m for m in table if m not in ("local-own", PERSONAL)]:
        table[model][OWN] = statistics.fmean(table[model][names[i]] for i in range(len(NODES)))
    return table


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    norm = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / norm if norm else float("nan")


def loss_vs_success(rows: dict, table: dict) -> dict:
    """Per offline metric: Spearman between lower loss and higher pooled success, over the seed's models."""
    models = [m for m in rows if ALL in table.get(m, {}) and UNION in rows[m]]
    return {metric: spearman([-rows[m][UNION][metric] for m in models], [table[m][ALL] for m in models])
            for metric in ("policy_loss", "action_mse")} | {"models": len(models)}


def summarise(tables: list[dict]) -> dict:
    """{model: {column: {mean, std, values}}} over seeds."""
    models = [m for m in tables[0] if all(m in t for t in tables)]
    return {m: {c: _spread([t[m][c] for t in tables]) for c in tables[0][m] if all(c in t[m] for t in tables)}
            for m in models}


def targets(summary: dict, federated: list[str]) -> list[dict]:
    """The issue's success targets on seed means; a comparison passes only beyond the larger std."""
    out = []
    central = summary["centralized"][SIMPLEST]
    out.append({"target": f"centralized >= 30% on {SIMPLEST}", "passed": central["mean"] >= 0.3,
                "detail": _cell(central)})
    best = max(federated, key=lambda a: summary[a][ALL]["mean"])
    fed, local = summary[best][ALL], summary["local-mean"][ALL]
    out.append({"target": "federated >= mean local-only on all tasks, beyond the spread",
                "passed": fed["mean"] - local["mean"] > max(fed["std"], local["std"]),
                "detail": f"{best} {_cell(fed)} vs local-only mean {_cell(local)}"})
    if PERSONAL in summary:
        for node in [n for n in NODES if n in summary[PERSONAL]]:
            mine, theirs = summary[PERSONAL][node], summary["local-own"][node]
            out.append({"target": f"{node}: personalised >= local-only on its own task, beyond the spread",
                        "passed": mine["mean"] - theirs["mean"] > max(mine["std"], theirs["std"]),
                        "detail": f"{_cell(mine)} vs {_cell(theirs)}"})
    return out


def report(sim: dict) -> str:
    """The success table, the rank agreement of the losses with success, and the targets."""
    summary, labs = sim["summary"], sim["labs"]
    cols = [*labs, ALL, OWN]
    lines = [f"simulated success rate (mean ± std over seeds; {sim['episodes']} unseen scenes per lab and model; "
             f"own-task: each node's lab, personalised and local-own on their own lab only)"]
    width = max(len(m) for m in summary) + 2
    lines.append(f"{'':<{width}}" + "".join(f"{c:>16}" for c in cols))
    for model, row in summary.items():
        lines.append(f"{model:<{width}}" + "".join(f"{_cell(row.get(c)):>16}" for c in cols))
    lines.append("")
    for metric, values in sim["rank_agreement"].items():
        lines.append(f"offline {metric} vs success (Spearman over models, per seed): "
                     + ", ".join(f"{v:+.2f}" for v in values))
    lines += ["", "success targets:"]
    lines += [f"  {'PASS' if t['passed'] else 'not shown'}: {t['target']}: {t['detail']}" for t in sim["targets"]]
    lines.append(f"simulated evaluation wall time (s): {sim['seconds']:.0f}")
    return "\n".join(lines)


def result(tables: list[dict], agreements: list[dict], federated: list[str], labs: list, episodes: int,
           seconds: float) -> dict:
    """The sim part of the benchmark's result."""
    summary = summarise(tables)
    return {"labs": [lab.name for lab in labs], "episodes": episodes, "seeds": tables, "summary": summary,
            "rank_agreement": {m: [a[m] for a in agreements] for m in ("policy_loss", "action_mse")},
            "targets": targets(summary, [a for a in federated if a in summary] or [REFERENCE]),
            "seconds": seconds}
