"""`zk0 bench gpu`: full-size SmolVLA rounds on CUDA with bf16 autocast, per batch size."""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import torch

from .report import BenchError


def bench_gpu(args: argparse.Namespace) -> dict:
    """Full-size SmolVLA rounds on CUDA with bf16 autocast: step time, samples/s, peak memory per batch size."""
    if not torch.cuda.is_available():
        raise BenchError(
            "gpu: CUDA is not available here (torch.cuda.is_available() is False); run it on a GPU machine"
        )
    from .models import build_policy, preprocessor_for, synthetic_batch
    from .step import cached_batches, gpu_round

    with tempfile.TemporaryDirectory() as tmp:
        policy = build_policy(Path(tmp), full=not args.smoke, device="cuda")
        pre = preprocessor_for(policy.config, "cuda")
    sizes = [2] if args.smoke else args.batch_sizes
    steps, results = (2 if args.smoke else args.steps), {}
    fed = {key: key for key in policy.config.image_features}
    for size, cached in ((size, cached) for size in sizes for cached in (False, True)):
        label = f"{size} cached" if cached else size  # cached: on the frozen-feature cache (zk0.features), filled
        try:
            batch = synthetic_batch(policy.config, size)
            batch = cached_batches(policy, [batch], fed)[0][0] if cached else batch
            results[label] = gpu_round(policy, pre, batch, steps=steps, warmup=2, lr=1e-4, mu=args.mu)
        except torch.cuda.OutOfMemoryError as err:
            results[label] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
            policy.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
    keys = ["step_s", "samples_per_s", "peak_allocated_gib", "peak_reserved_gib"]
    rows = [[size, *(r.get(k, r.get("error", "")) for k in keys)] for size, r in results.items()]
    return {
        "benchmark": "gpu",
        "settings": {"smoke": args.smoke, "steps": steps, "mu": args.mu, "device": torch.cuda.get_device_name(),
                     "torch": torch.__version__},
        "results": {str(k): v for k, v in results.items()},
        "tables": [{"title": f"one local round of {steps} steps per batch size (bf16 autocast, 512x512, two cameras)",
                    "headers": ["batch", *keys], "rows": rows}],
        "targets": [],
    }
