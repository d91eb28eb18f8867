"""Closed-loop evaluation: how often a policy makes the simulated arm succeed at each lab's task.

Episodes run through LeRobot's own rollout (`lerobot.scripts.lerobot_eval.rollout`: LeRobot's observation
conversion, the policy's processors with the lab's camera map, `select_action`) on `SimArm`, whose
`is_success` LeRobot reads. Success rates carry a 95% Wilson interval.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from ..labs import EVAL_SEED_BASE, Lab
from .arm import SimArm

log = logging.getLogger("zk0")


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (sensible at 0 and n, unlike the normal approximation)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def eval_seeds(lab: Lab, seed: int, episodes: int) -> list[int]:
    """Scenes never recorded (recording seeds stay below EVAL_SEED_BASE), the same for every model scored."""
    return [EVAL_SEED_BASE + seed * 10_000 + i for i in range(episodes)]


def _rollout(policy, preprocessor, postprocessor, arm: SimArm, seed: int, frames: list | None) -> dict:
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.scripts.lerobot_eval import rollout

    venv = gym.vector.SyncVectorEnv([lambda: arm], autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    callback = None if frames is None else (lambda v: frames.append(v.envs[0].render()))
    identity = PolicyProcessorPipeline(steps=[])
    # LeRobot's rollout draws a progress bar it offers no switch for: kept on a terminal, dropped from logs (it
    # would write one line of thousands of characters per episode into the ServerApp's log).
    quiet = contextlib.nullcontext() if sys.stderr.isatty() else contextlib.redirect_stderr(io.StringIO())
    with quiet:
        return rollout(venv, policy, identity, identity, preprocessor, postprocessor, seeds=[seed],
                       render_callback=callback)


def evaluate_lab(policy, preprocessor, postprocessor, lab: Lab, episodes: int, seed: int = 0,
                 video_dir: Path | None = None, videos: int = 0) -> dict:
    """Success rate (with its Wilson interval) and mean steps to success on `episodes` unseen scenes."""
    arm, started, successes, steps = SimArm(lab), time.perf_counter(), 0, []
    policy.eval()
    try:
        for i, episode_seed in enumerate(eval_seeds(lab, seed, episodes)):
            frames = [] if video_dir is not None and i < videos else None
            # Flow matching samples noise per action chunk: seeded per scene, every model meets the same draws.
            with torch.random.fork_rng(), torch.inference_mode():
                torch.manual_seed(episode_seed)
                out = _rollout(policy, preprocessor, postprocessor, arm, episode_seed, frames)
            success = out["success"][0]
            if bool(success.any()):
                successes += 1
                steps.append(int(success.nonzero()[0]) + 1)
            if frames:
                _save_video(Path(video_dir) / f"{lab.name}-episode-{i}.mp4", frames, lab.fps)
    finally:
        arm.close()
    lo, hi = wilson(successes, episodes)
    return {"success_rate": successes / episodes, "ci_low": lo, "ci_high": hi, "successes": successes,
            "episodes": episodes, "mean_steps_to_success": float(np.mean(steps)) if steps else None,
            "seconds": time.perf_counter() - started}


def _save_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    from lerobot.utils.io_utils import write_video

    path.parent.mkdir(parents=True, exist_ok=True)
    # libx264 needs even sizes.
    h, w = (frames[0].shape[0] // 2) * 2, (frames[0].shape[1] // 2) * 2
    write_video(path, [f[:h, :w] for f in frames], fps)


def evaluate_labs(policy, path: str, stats: dict | None, labs: list[Lab], episodes: int, seed: int = 0,
                  video_dir: Path | None = None, videos: int = 0) -> dict:
    """Every lab's task: the processors saved at `path` (with `stats`, None = theirs) and the lab's camera map."""
    from ..cameras import parse_camera_map
    from ..model import load_processors

    device, out = str(next(policy.parameters()).device), {}
    for lab in labs:
        pre, post = load_processors(path, device, parse_camera_map(lab.camera_map), stats)
        out[lab.name] = evaluate_lab(policy, pre, post, lab, episodes, seed, video_dir, videos)
        log.info("sim %s: success %d/%d (95%% CI %.2f-%.2f) in %.1fs", lab.name, out[lab.name]["successes"], episodes,
                 out[lab.name]["ci_low"], out[lab.name]["ci_high"], out[lab.name]["seconds"])
    total = sum(r["successes"] for r in out.values())
    n = episodes * len(labs)
    lo, hi = wilson(total, n)
    out["all"] = {"success_rate": total / n, "ci_low": lo, "ci_high": hi, "successes": total, "episodes": n}
    return out
