"""Weights one array per tensor, as they travelled before packing: the benchmarks' baseline and error probe.

zk0 sends every trainable tensor packed in one array (zk0.wire.pack); these per-tensor arrays use the same
conversion, so their bytes and rounding are what a packed message carries, split by name.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .. import wire


def encode(state: Mapping[str, torch.Tensor], fmt: str) -> dict[str, np.ndarray]:
    """Tensors to numpy arrays in wire format `fmt` (new memory); raises ValueError on a finite value out of range."""
    if fmt not in wire.FORMATS:
        raise ValueError(f"unknown wire format {fmt!r}: use one of {', '.join(wire.FORMATS)}")
    return {name: wire.pack({name: tensor}, fmt).reshape(tuple(tensor.shape)) for name, tensor in state.items()}


def decode(arrays: Mapping[str, np.ndarray], fmt: str) -> dict[str, torch.Tensor]:
    """Wire arrays back to float32 tensors (new memory, never aliasing the arrays)."""
    return {name: view.to(torch.float32, copy=True) for name, view in wire.views(arrays, fmt).items()}


def wire_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of the arrays' values (no headers or names)."""
    return sum(np.asarray(a).nbytes for a in arrays.values())


def random_update(shapes: dict[str, tuple], fmt: str, seed: int) -> dict[str, np.ndarray]:
    """A node's update of these shapes in wire format: small random weights, reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return {k: encode({k: 0.02 * torch.randn(s, generator=g)}, fmt)[k] for k, s in shapes.items()}
