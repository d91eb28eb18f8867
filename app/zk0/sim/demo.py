"""`zk0 demo --sim`: each simulated lab's dataset, a held-out evaluation set and the tiny base policy, offline."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..labs import LABS, Lab
from .record import record_lab

SERVER = "server-eval"


def sim_demo_paths(out: Path, labs: list[Lab]) -> dict:
    """Where `write_sim_demo` puts everything: node-<i> is the i-th lab, as `experiments/sim.env` lists them."""
    out = Path(out).resolve()
    datasets = {f"node-{i}": out / "datasets" / lab.name for i, lab in enumerate(labs)}
    datasets[SERVER] = out / "datasets" / SERVER
    cameras = {f"node-{i}": lab.camera_map for i, lab in enumerate(labs)}
    cameras[SERVER] = LABS["lift-top"].camera_map
    return {"root": out, "vlm": out / "vlm", "base-policy": out / "base-policy", "datasets": datasets,
            "cameras": cameras, "labs": [lab.name for lab in labs]}


def write_sim_demo(out: Path, labs: list[Lab] | None = None, episodes: int = 12, seed: int = 0) -> dict:
    """Record what is missing or stale (each dataset is cached by content) and build the base policy once."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from ..demo import build_base_policy
    from ..tiny_vlm import build_tiny_vlm
    from . import require

    require()
    labs = labs or list(LABS.values())
    paths = sim_demo_paths(out, labs)
    for i, lab in enumerate(labs):
        record_lab(lab, paths["datasets"][f"node-{i}"], episodes, seed)
    # The server's held-out set: the simplest lab's task on scenes no node recorded (another seed).
    server = replace(LABS["lift-top"], name=SERVER)
    record_lab(server, paths["datasets"][SERVER], max(2, episodes // 4), seed + 1)
    if not (paths["base-policy"] / "config.json").is_file():
        build_tiny_vlm(paths["vlm"])
        stats = LeRobotDataset(SERVER, root=paths["datasets"][SERVER], video_backend="pyav").meta.stats
        build_base_policy(paths["base-policy"], paths["vlm"], seed=seed, stats=stats)
    return paths
