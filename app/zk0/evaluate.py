"""Deterministic evaluation: flow-matching loss and action-chunk MSE in dataset units."""

from __future__ import annotations

import torch


@torch.no_grad()
def evaluate_policy(policy, preprocessor, postprocessor, batches: list[dict], seed: int = 0) -> dict[str, float]:
    """Policy loss and action MSE over fixed batches, with seeded flow-matching noise."""
    policy.eval()
    device = next(policy.parameters()).device
    loss_sum, mse_sum, mse_count, samples = 0.0, 0.0, 0.0, 0
    # Forking the RNG makes noise and time draws identical across calls without
    # disturbing the caller's random stream.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for raw in batches:
            target = raw["action"].float()
            pad = raw.get("action_is_pad")
            batch = preprocessor(dict(raw))
            loss, _ = policy.forward(batch)
            policy.reset()
            predicted = policy.predict_action_chunk(batch)
            predicted = postprocessor(predicted).float().cpu()
            horizon = min(predicted.shape[1], target.shape[1])
            err = (predicted[:, :horizon] - target[:, :horizon]).pow(2)
            valid = torch.ones(err.shape[:2]) if pad is None else (~pad[:, :horizon]).float()
            mse_sum += float((err.mean(-1) * valid).sum())
            mse_count += float(valid.sum())
            n = len(target)
            loss_sum += float(loss) * n
            samples += n
    return {
        "policy_loss": loss_sum / max(samples, 1),
        "action_mse": mse_sum / max(mse_count, 1.0),
        "num-samples": samples,
    }
