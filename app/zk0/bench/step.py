"""Training-step speed: zk0's FedProx round, with and without the frozen-feature cache, against a plain LeRobot loop."""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..train import TrainPlan, train_round
from .report import target

ARMS = ("plain", "zk0", "zk0_mu0", "zk0_lora", "zk0_cached")


def plain_steps(policy, preprocessor, batches, steps: int, optimizer, scheduler) -> None:
    """LeRobot's update_policy without an accelerator: forward, backward, clip, step; no proximal term."""
    params = [p for p in policy.parameters() if p.requires_grad]
    clip = policy.config.optimizer_grad_clip_norm
    policy.train()
    for _ in range(steps):
        batch = preprocessor(next(batches))
        loss, _ = policy.forward(batch)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip, error_if_nonfinite=False)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        loss.item(), grad_norm.item()  # lerobot-train reads both every step for its metrics


def _plain_optimizer(policy, learning_rate: float, total_steps: int):
    """The same AdamW and cosine-with-warm-up presets zk0 builds, made once as a plain trainer does."""
    policy.config.optimizer_lr = learning_rate
    optimizer = policy.config.get_optimizer_preset().build([p for p in policy.parameters() if p.requires_grad])
    return optimizer, policy.config.get_scheduler_preset().build(optimizer, num_training_steps=total_steps)


def compare(
    policy, preprocessor, batches: list[dict], *, block: int, reps: int, warmup: int, lr: float, mu: float,
    lora_policy=None, cached: list[dict] | None = None, arms: tuple[str, ...] = ARMS, cpu: dict | None = None,
) -> dict:
    """Seconds per block for each arm, run interleaved (ABBA) on one model and the same batches.

    A zk0 block is one `train_round` (it builds its optimizer and proximal anchors, as every
    ClientApp message does); the plain arm keeps one optimizer, as a single training run does.
    A zk0 round with mu = 0 separates the proximal term's cost from the rest; `lora_policy` (the same
    model wrapped with LoRA adapters, ZK0_TRAINABLE=lora) adds a zk0 round that trains only adapters;
    `cached` (the same batches carrying frozen image features, zk0.features) adds a round on the cache.
    `cpu`, when given, receives each block's CPU seconds per arm: with one torch thread, a figure that
    other processes' load on a shared host barely moves.
    """
    data = itertools.cycle(batches)
    total = (reps + warmup) * block
    optimizer, scheduler = _plain_optimizer(policy, lr, total)
    def plan(r: int, proximal_mu: float = mu) -> TrainPlan:
        return TrainPlan(block, r * block, total, lr, proximal_mu)

    every = {
        "plain": lambda r: plain_steps(policy, preprocessor, data, block, optimizer, scheduler),
        "zk0": lambda r: train_round(policy, preprocessor, data, plan(r)),
        "zk0_mu0": lambda r: train_round(policy, preprocessor, data, plan(r, 0.0)),
    }
    if lora_policy is not None:
        every["zk0_lora"] = lambda r: train_round(lora_policy, preprocessor, data, plan(r))
    if cached is not None:
        features = itertools.cycle(cached)
        every["zk0_cached"] = lambda r: train_round(policy, preprocessor, features, plan(r))
    chosen = {arm: run for arm, run in every.items() if arm in arms}
    seconds = {arm: [] for arm in chosen}
    for rep in range(warmup + reps):
        order = list(chosen) if rep % 2 == 0 else list(reversed(chosen))
        for arm in order:
            started, cpu_started = time.perf_counter(), time.process_time()
            chosen[arm](rep)
            if rep >= warmup:
                seconds[arm].append(time.perf_counter() - started)
                if cpu is not None:
                    cpu.setdefault(arm, []).append(time.process_time() - cpu_started)
    return seconds


def cached_batches(policy, batches: list[dict], fed: dict[str, str]) -> tuple[list[dict], dict]:
    """The batches on the cache's path (features in place of images) and the fill's figures.

    The fill is SmolVLA's own image path over every (frame, camera) once: its seconds per frame-camera are
    what a node pays the first time it meets a frame; bytes per frame-camera are what the cache stores.
    """
    from ..features import install, with_features

    install(policy)
    started, cpu_started = time.perf_counter(), time.process_time()
    cached = [with_features(policy, raw, fed) for raw in batches]
    items = sum(len(raw["action"]) for raw in batches) * len(fed)
    one = next(v for k, v in cached[0].items() if k.startswith("observation.image_features."))
    return cached, {"fill_s_per_frame_camera": (time.perf_counter() - started) / items,
                    "fill_cpu_s_per_frame_camera": (time.process_time() - cpu_started) / items,
                    "bytes_per_frame_camera": one[0].numel() * one.element_size()}


def same_loss(policy, preprocessor, raw: dict, cached: dict) -> float:
    """Relative difference of one step's loss on a batch and on its cached form (same flow-matching draws)."""
    losses = []
    for batch in (raw, cached):
        torch.manual_seed(0)
        policy.train()
        with torch.no_grad():
            losses.append(float(policy.forward(preprocessor(dict(batch)))[0]))
    return abs(losses[1] - losses[0]) / abs(losses[0])


def bench_step(args: argparse.Namespace) -> dict:
    """Steps/s of zk0's train_round (also on the frozen-feature cache) against a plain LeRobot-style loop."""
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = ("plain", *(a for a in args.arms.split(",") if a != "plain")) if args.arms else ARMS
    policy, pre, batches, fed = _step_inputs(args)
    lora_policy = _step_inputs(args, lora=True)[0] if "zk0_lora" in arms else None
    cached, fill = cached_batches(policy, batches, fed)
    loss_diff = same_loss(policy, pre, batches[0], cached[0])
    smoke = args.smoke
    block = args.block or (2 if smoke else 30 if args.model == "tiny" else 3)
    reps = 1 if smoke else args.reps or (6 if args.model == "tiny" else 1)
    warmup = 0 if smoke or args.model == "full" else 1
    cpu: dict = {}
    seconds = compare(policy, pre, batches, block=block, reps=reps, warmup=warmup, lr=1e-4, mu=args.mu,
                      lora_policy=lora_policy, cached=cached, arms=arms, cpu=cpu)
    # Medians: a burst of load from other processes on a shared host hits single blocks.
    rate = {arm: block / statistics.median(s) for arm, s in seconds.items()}
    cpu_step = {arm: statistics.median(s) / block for arm, s in cpu.items()}
    rows = [[arm, rate[arm], 1 / rate[arm], rate[arm] / rate["plain"], cpu_step[arm], cpu_step["plain"] / cpu_step[arm]]
            for arm in seconds]
    batch_size = len(batches[0]["action"])
    targets = _step_targets(rate, loss_diff, args.model)
    return {
        "benchmark": "step",
        "settings": {"smoke": smoke, "model": args.model, "batch_size": batch_size, "block_steps": block, "reps": reps,
                     "warmup_blocks": warmup, "mu": args.mu, "torch_threads": torch.get_num_threads(),
                     "arms": list(seconds)},
        "seconds_per_block": seconds,
        "cpu_seconds_per_block": cpu,
        "steps_per_s": rate,
        "ratio": rate["zk0"] / rate["plain"] if "zk0" in rate else None,
        "cached_ratio": rate["zk0_cached"] / rate["plain"] if "zk0_cached" in rate else None,
        "cache": {**fill, "loss_rel_diff": loss_diff},
        "tables": _step_tables(args, batch_size, reps, block, rows, fill, loss_diff),
        "targets": targets,
    }


def _step_targets(rate: dict[str, float], loss_diff: float, model: str) -> list:
    """The step benchmark's targets for the arms that ran (the cache's speed-up only at full size)."""
    targets = [target("zk0 cached-step loss vs the plain step's (relative difference)", loss_diff, 1e-5, True)]
    if "zk0" in rate:
        targets.append(target("zk0 steps/s over plain loop steps/s", rate["zk0"] / rate["plain"], 0.95, False))
    if "zk0_lora" in rate:
        lora = rate["zk0_lora"] / rate["zk0"]
        targets.append(target("LoRA step (zk0_lora) steps/s over the full-expert step (zk0)", lora, 1.0, False))
    if "zk0_cached" in rate and model == "full":
        cached_ratio = rate["zk0_cached"] / rate["plain"]
        targets.append(target("zk0 on the feature cache steps/s over plain loop steps/s", cached_ratio, 2.5, False))
    return targets


def _step_tables(args: argparse.Namespace, batch_size: int, reps: int, block: int, rows: list, fill: dict,
                 loss_diff: float) -> list[dict]:
    """The arms' speed table and the feature cache's fill and size table."""
    return [{
        "title": f"{args.model} model, batch {batch_size}: {reps} interleaved blocks of {block} steps per arm, "
                 "median block "
                 f"(zk0 = train_round with mu={args.mu}, a fresh round per block; zk0_lora = the same with "
                 f"ZK0_TRAINABLE=lora at LeRobot's defaults, rank 8; zk0_cached = the same on the frozen-feature "
                 "cache, "
                 f"filled; batches decoded beforehand for every arm; {torch.get_num_threads()} torch threads)",
        "headers": ["arm", "steps/s", "s/step", "vs plain", "CPU s/step", "vs plain (CPU)"],
        "rows": rows,
    }, {
        "title": "frozen-feature cache: fill (SmolVLA's image path once per frame-camera) and size",
        "headers": ["fill s per frame-camera", "CPU s", "bytes per frame-camera", "loss vs plain (relative)"],
        "rows": [[fill["fill_s_per_frame_camera"], fill["fill_cpu_s_per_frame_camera"],
                  fill["bytes_per_frame_camera"], loss_diff]],
    }]


def _step_inputs(args: argparse.Namespace, lora: bool = False):
    """(policy, preprocessor, raw batches, fed cameras): the demo's base policy and data, or SmolVLA built from files.

    `lora`: the same policy wrapped with LoRA adapters at LeRobot's defaults (ZK0_TRAINABLE=lora).
    """
    from ..lora import Adapter, wrap

    if args.model == "tiny":
        from ..cameras import parse_camera_map
        from ..data import batch_stream, open_dataset
        from ..model import load_policy, load_processors
        from .learning import demo_assets

        demo = demo_assets(args.demo_dir)
        rename = parse_camera_map(demo["cameras"]["node-0"])
        policy = load_policy(str(demo["base-policy"]), "cpu", Adapter("lora" if lora else "expert"))
        pre, _ = load_processors(str(demo["base-policy"]), "cpu", rename)
        dataset = open_dataset(str(demo["datasets"]["node-0"]), policy.config)
        stream = batch_stream(dataset, args.batch_size or 8, seed=0)
        return policy, pre, [next(stream) for _ in range(2 if args.smoke else 8)], rename
    from .models import build_policy, preprocessor_for, synthetic_batch

    with tempfile.TemporaryDirectory() as tmp:  # the preprocessor reads its tokenizer from there
        policy = build_policy(Path(tmp), full=not args.smoke)
        pre = preprocessor_for(policy.config)
    if lora:
        policy = wrap(policy, "bench", Adapter("lora"), seed=0)
    fed = {key: key for key in policy.config.image_features}
    return policy, pre, [synthetic_batch(policy.config, args.batch_size or 1)], fed


def gpu_round(policy, preprocessor, batch: dict, *, steps: int, warmup: int, lr: float, mu: float) -> dict:
    """One local zk0 round on CUDA (bf16 autocast inside train_round): time, samples/s, peak memory."""
    data = itertools.repeat(batch)
    if warmup:
        train_round(policy, preprocessor, data, TrainPlan(warmup, 0, warmup + steps, lr, mu))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    metrics = train_round(policy, preprocessor, data, TrainPlan(steps, warmup, warmup + steps, lr, mu))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "round_s": seconds,
        "step_s": seconds / steps,
        "samples_per_s": metrics["samples"] / seconds,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "loss": metrics["loss"],
    }
