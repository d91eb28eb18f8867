"""Training-step speed: zk0's FedProx round against a plain LeRobot-style loop, and on a GPU."""

from __future__ import annotations

import itertools
import time

import torch

from .train import TrainPlan, train_round


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
    policy, preprocessor, batches: list[dict], *, block: int, reps: int, warmup: int, lr: float, mu: float, lora_policy=None,
) -> dict:
    """Seconds per block for each arm, run interleaved (ABBA) on one model and the same batches.

    A zk0 block is one `train_round` (it builds its optimizer and proximal anchors, as every
    ClientApp message does); the plain arm keeps one optimizer, as a single training run does.
    A zk0 round with mu = 0 separates the proximal term's cost from the rest; `lora_policy` (the same
    model wrapped with LoRA adapters, ZK0_TRAINABLE=lora) adds a zk0 round that trains only adapters.
    """
    data = itertools.cycle(batches)
    total = (reps + warmup) * block
    optimizer, scheduler = _plain_optimizer(policy, lr, total)
    arms = {
        "plain": lambda r: plain_steps(policy, preprocessor, data, block, optimizer, scheduler),
        "zk0": lambda r: train_round(policy, preprocessor, data, TrainPlan(block, r * block, total, lr, mu)),
        "zk0_mu0": lambda r: train_round(policy, preprocessor, data, TrainPlan(block, r * block, total, lr, 0.0)),
    }
    if lora_policy is not None:
        arms["zk0_lora"] = lambda r: train_round(lora_policy, preprocessor, data, TrainPlan(block, r * block, total, lr, mu))
    seconds = {arm: [] for arm in arms}
    for rep in range(warmup + reps):
        order = list(arms) if rep % 2 == 0 else list(reversed(arms))
        for arm in order:
            started = time.perf_counter()
            arms[arm](rep)
            if rep >= warmup:
                seconds[arm].append(time.perf_counter() - started)
    return seconds


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
