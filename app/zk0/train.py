"""Local FedProx training: LeRobot's SmolVLA presets plus the proximal term."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("zk0")


@dataclass(frozen=True)
class TrainPlan:
    """One round of local training, placed on the experiment's global LR schedule."""

    steps: int  # optimizer steps this round
    start_step: int  # global step at which this round starts: (round - 1) * steps
    total_steps: int  # steps of the whole experiment, so the schedule spans all rounds
    learning_rate: float
    proximal_mu: float
    log_every: int = 5


def proximal_term(params: list[torch.Tensor], anchors: list[torch.Tensor], mu: float) -> torch.Tensor:
    """(mu/2) * ||w - w_global||^2 over the trainable parameters (squared norm)."""
    # mse_loss(sum) is one fused kernel each way: about half the time of (p - a).pow(2).sum(),
    # which materialises the difference and its square for autograd (identical gradients).
    total = torch.zeros((), device=params[0].device, dtype=torch.float32)
    for p, a in zip(params, anchors, strict=True):
        total = total + F.mse_loss(p.float(), a, reduction="sum")
    return 0.5 * mu * total


def build_optimizer(policy, plan: TrainPlan):
    """SmolVLA's AdamW and cosine-with-warmup presets, fast-forwarded to `plan.start_step`."""
    config = policy.config
    config.optimizer_lr = plan.learning_rate
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = config.get_optimizer_preset().build(params)
    # Built for the whole experiment, not for one round: rebuilding a warm-up+cosine schedule
    # per round would restart warm-up and run a full cosine cycle every round.
    scheduler = config.get_scheduler_preset().build(optimizer, num_training_steps=plan.total_steps)
    scheduler.last_epoch = plan.start_step
    for group, base_lr, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base_lr * fn(plan.start_step)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return optimizer, scheduler


def _autocast(device: torch.device):
    # bf16 autocast on GPUs; CPU autocast is slower than fp32 for this model, so it stays off.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


METRICS = ("loss", "policy_loss", "proximal_loss", "grad_norm")  # averaged over a round's steps for the reply


def _check_finite(rows: list[list[float]], first_step: int) -> None:
    """Stop the round at the first step whose loss is NaN or infinite (`rows`: steps from `first_step` on)."""
    for offset, row in enumerate(rows):
        if not math.isfinite(row[0]):
            raise FloatingPointError(f"training loss became {row[0]} at local step {first_step + offset + 1}")


def _averages(rows: list[list[float]], steps: int) -> dict[str, float]:
    """Each of METRICS summed over the steps' rows and divided by `steps`."""
    sums = dict.fromkeys(METRICS, 0.0)
    for row in rows:  # in step order, as the reply's averages always were (sum() compensates, which differs)
        for key, value in zip(METRICS, row, strict=True):
            sums[key] += value
    return {key: value / steps for key, value in sums.items()}


def train_round(policy, preprocessor, batches: Iterator[dict], plan: TrainPlan) -> dict[str, float]:
    """Run `plan.steps` optimizer steps; return averaged metrics for the reply."""
    device = next(policy.parameters()).device
    optimizer, scheduler = build_optimizer(policy, plan)
    params = [p for p in policy.parameters() if p.requires_grad]
    anchors = [p.detach().float().clone() for p in params]
    clip = policy.config.optimizer_grad_clip_norm
    no_prox = torch.zeros((), device=device)
    # Each step's metrics stay on the device until a log line reads them: reading them every step makes the host
    # wait for the device every step. In float64, the host's floats they become, so the averages are unchanged.
    rows = torch.zeros(plan.steps, len(METRICS), dtype=torch.float64, device=device)
    read: list[list[float]] = []
    samples, started, waited = 0, time.perf_counter(), 0.0
    policy.train()
    for step in range(plan.steps):
        fetched = time.perf_counter()
        raw = next(batches)
        waited += time.perf_counter() - fetched
        batch = preprocessor(raw)
        with _autocast(device):
            policy_loss, _ = policy.forward(batch)
        prox = proximal_term(params, anchors, plan.proximal_mu) if plan.proximal_mu > 0 else no_prox
        loss = policy_loss.float() + prox
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip, error_if_nonfinite=False)
        optimizer.step()
        scheduler.step()
        rows[step] = torch.stack([v.detach().to(torch.float64) for v in (loss, policy_loss, prox, grad_norm)])
        samples += len(batch["action"])
        if (step + 1) % plan.log_every == 0 or step + 1 == plan.steps:
            # A non-finite loss is found here, up to log_every - 1 steps late; the round fails all the same.
            _check_finite(new := rows[len(read):step + 1].tolist(), len(read))
            read += new
            log.info(
                "step %d/%d (global %d): loss %.4f policy %.4f prox %.2e lr %.2e",
                step + 1, plan.steps, plan.start_step + step + 1, *read[-1][:3], optimizer.param_groups[0]["lr"],
            )
    metrics = _averages(read, plan.steps)
    metrics.update(
        lr=optimizer.param_groups[0]["lr"],
        steps=plan.steps,
        samples=samples,
        train_seconds=time.perf_counter() - started,
        data_seconds=waited,  # of train_seconds, waiting for batches (reading and decoding)
    )
    return metrics
