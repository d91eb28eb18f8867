"""PNG plots of an experiment's history, readable without WandB."""

from __future__ import annotations

import copy
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in containers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

log = logging.getLogger("zk0")


def _series(history: list[dict], pick) -> tuple[list[int], list[float]]:
    points = [(r["round"], pick(r)) for r in history]
    points = [(x, y) for x, y in points if y is not None]
    return [x for x, _ in points], [y for _, y in points]


def _save(fig, path: Path) -> Path:
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.partial")
    fig.savefig(partial, dpi=100, format="png")
    plt.close(fig)
    os.replace(partial, path)  # a reader, or a server killed mid-write, never sees half a PNG
    return path


def plot_server_eval(history: list[dict], path: Path) -> Path:
    """Server evaluation loss and action MSE per round; simulated success beside them when it was measured."""
    sim = any(r.get("sim_eval") for r in history)
    fig, axes = plt.subplots(1, 3 if sim else 2, figsize=(15 if sim else 10, 4))
    panels = ((axes[0], "policy_loss", "policy loss"), (axes[1], "action_mse", "action MSE (action units²)"))
    for ax, key, title in panels:
        xs, ys = _series(history, lambda r, k=key: (r.get("server_eval") or {}).get(k))
        ax.plot(xs, ys, marker="o")
        ax.set(title=f"server evaluation: {title}", xlabel="round")
        ax.grid(alpha=0.3)
    if sim:
        plot_success(history, axes[2])
    return _save(fig, path)


def plot_success(history: list[dict], ax) -> None:
    """Per simulated lab and over all labs: success rate per round with its 95% interval."""
    labs = sorted({lab for r in history for lab in (r.get("sim_eval") or {})})
    for lab in labs:
        points = [(r["round"], r["sim_eval"][lab]) for r in history if lab in (r.get("sim_eval") or {})]
        xs, ys = [x for x, _ in points], [p["success_rate"] for _, p in points]
        err = [[y - p["ci_low"] for y, (_, p) in zip(ys, points, strict=True)],
               [p["ci_high"] - y for y, (_, p) in zip(ys, points, strict=True)]]
        ax.errorbar(xs, ys, yerr=err if lab == "all" else None, marker="o", capsize=3, label=lab,
                    lw=2.5 if lab == "all" else 1, alpha=1 if lab == "all" else 0.6)
    ax.set(title="simulated success rate (95% CI: all labs)", xlabel="round", ylim=(-0.05, 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_client_loss(history: list[dict], path: Path) -> Path:
    """Each node's training loss per round, and its held-out loss where evaluated."""
    fig, ax = plt.subplots(figsize=(7, 4))
    names = sorted({c.get("name", k) for r in history for k, c in r.get("clients", {}).items()})
    for name in names:
        def pick(r, kind, n=name, key="policy_loss"):
            client = next((c for k, c in r.get("clients", {}).items() if c.get("name", k) == n), None)
            return ((client or {}).get(kind) or {}).get(key)
        line, = ax.plot(*_series(history, lambda r: pick(r, "train")), marker="o", label=f"{name} train")
        ax.plot(*_series(history, lambda r: pick(r, "eval")), ls="--", color=line.get_color(), label=f"{name} held-out")
        # The node's personal model (ZK0_PERSONALIZE_STEPS), scored on the same held-out batches after the last round.
        personal = _series(history, lambda r: pick(r, "eval", key="personal_policy_loss"))
        if personal[0]:
            ax.plot(*personal, ls="", marker="*", ms=11, color=line.get_color(), label=f"{name} personal held-out")
    ax.set(title="node policy loss", xlabel="round")
    ax.grid(alpha=0.3)
    if names:
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_bytes(history: list[dict], path: Path) -> Path:
    """Payload bytes sent to and received from nodes per round, in MiB."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for direction in ("sent", "received"):
        xs, ys = _series(history, lambda r, d=direction: r.get("bytes", {}).get(d))
        offset = 0.2 if direction == "received" else -0.2
        ax.bar([x + offset for x in xs], [y / 2**20 for y in ys], width=0.4, label=direction)
    ax.set(title="payload per round", xlabel="round", ylabel="MiB")
    ax.legend()
    return _save(fig, path)


def write_plots(history: list[dict], out_dir: Path) -> list[Path]:
    """All plots of the experiment, under out_dir/plots."""
    plots = Path(out_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    return [
        plot_server_eval(history, plots / "server_eval.png"),
        plot_client_loss(history, plots / "client_loss.png"),
        plot_bytes(history, plots / "bytes.png"),
    ]


class Plotter:
    """Writes the plots in a thread of its own, one history at a time, so a round's end does not wait for
    matplotlib (write_plots measured 0.37-0.57 s on a 2-core host at load 9; demo rounds take 6-8 s): the
    server sends the next round meanwhile.
    Only this thread uses matplotlib; `wait()` (at the end of a run, whatever ends it) lets it finish."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zk0-plots")

    def submit(self, history: list[dict]) -> None:
        self.pool.submit(self._write, copy.deepcopy(history))  # later rounds update their records in place

    def _write(self, history: list[dict]) -> None:
        try:
            write_plots(history, self.out_dir)
        except (OSError, ValueError, RuntimeError) as err:  # a plot is a view of the records, never worth a run
            log.warning("plots under %s not written: %s", self.out_dir / "plots", err)

    def wait(self) -> None:
        self.pool.shutdown(wait=True)
