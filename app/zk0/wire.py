"""The wire format of trainable weights: fp32, fp16 or bf16 (as its int16 view), packing and aggregation.

Weights travel packed: every trainable tensor, in name order, in one flat array. Flower moves a
message object by object (each array and each 5 MiB chunk is one call and, on a SuperLink with
--database, one SQLite transaction), so one array instead of hundreds of tensors makes each message
a handful of calls. Both ends know the layout (names and shapes) from the same base policy; its
fingerprint travels beside the weights and is checked on arrival.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch

FORMATS = ("fp32", "fp16", "bf16")
# int8-delta: the server sends fp16 weights; a node replies with its update (trained - received) in
# int8, one fp32 scale per DELTA_BLOCK values (absmax / 127), and the server adds the weighted mean
# update to its fp32 global model. Half the bytes of fp16 on the way up.
DELTA = "int8-delta"
DELTA_BLOCK = 4096
SCALES = "scales"  # the ArrayRecord key of an int8-delta reply's block scales
# What each format travels as: Flower's ArrayRecord rejects torch.bfloat16, so bf16 goes as the
# int16 view of its bits and is viewed back exactly.
_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_NUMPY = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "bf16": np.dtype(np.int16)}
PACKED = "packed"  # the ArrayRecord key of the one array a message's weights travel in
# Values of a 16-bit update converted to fp32 at once while aggregating (128 KiB): no larger than
# torch's parallel grain (32768), so each add runs on the calling thread, where the cache still holds
# the converted chunk; thread-pool hand-offs per chunk cost more than they save (10x on a busy host).
_CHUNK = 2**15


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown wire format {fmt!r}: use one of {', '.join(FORMATS)}")


def _check_range(name: str, value: torch.Tensor, out: torch.Tensor, fmt: str) -> None:
    # A finite weight beyond the format's range would arrive as inf and then be dropped by the
    # server as non-finite; failing here names the tensor where the problem starts.
    if fmt != "fp32" and torch.isinf(out).any() and torch.isinf(out[torch.isfinite(value)]).any():
        limit = torch.finfo(_TORCH[fmt]).max
        raise ValueError(
            f"weight {name}: max |value| {value[torch.isfinite(value)].abs().max().item():.4g} "
            f"exceeds the {fmt} range (+-{limit:.4g}); send it as fp32 or bf16"
        )


def layout_fingerprint(shapes: Mapping[str, tuple], tag: str = "") -> str:
    """Short hash of the packed layout: names in packing order and their shapes (and `tag`: e.g. LoRA's alpha)."""
    text = ";".join(f"{name}:{tuple(shapes[name])}" for name in sorted(shapes)) + (f"|{tag}" if tag else "")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pack(state: Mapping[str, torch.Tensor], fmt: str) -> np.ndarray:
    """Every tensor, in name order, converted straight into one flat wire array (no per-tensor copy)."""
    _check_format(fmt)
    names = sorted(state)
    out = torch.empty(sum(state[n].numel() for n in names), dtype=_TORCH[fmt])
    offset = 0
    for name in names:
        value = state[name].detach()
        part = out[offset : offset + value.numel()]
        part.copy_(value.reshape(-1))  # converts dtype and device on the way
        _check_range(name, value.reshape(-1).to("cpu"), part, fmt)
        offset += value.numel()
    return (out.view(torch.int16) if fmt == "bf16" else out).numpy()


def unpack(flat: np.ndarray, shapes: Mapping[str, tuple]) -> dict[str, np.ndarray]:
    """Views of a packed array, one per name (in `shapes`' order), without copying."""
    flat = np.asarray(flat)
    sizes = {name: math.prod(shapes[name]) for name in sorted(shapes)}
    if flat.ndim != 1 or flat.size != sum(sizes.values()):
        raise ValueError(
            f"packed weights hold {flat.size} values in shape {flat.shape}; the layout needs {sum(sizes.values())}"
        )
    views, offset = {}, 0
    for name, size in sizes.items():
        views[name] = flat[offset : offset + size].reshape(shapes[name])
        offset += size
    return {name: views[name] for name in shapes}


def _as_torch(name: str, array: np.ndarray, fmt: str) -> torch.Tensor:
    """A zero-copy torch view of one wire array, in its wire dtype (bf16 viewed back from int16)."""
    array = np.asarray(array)
    if array.dtype != _NUMPY[fmt]:
        raise ValueError(f"weight {name}: dtype {array.dtype} on the wire, format {fmt} sends {_NUMPY[fmt]}")
    if not array.flags.c_contiguous:
        array = array.copy(order="C")  # not np.ascontiguousarray: it turns 0-d arrays into 1-d
    with warnings.catch_warnings():
        # Read-only memory (e.g. a view of a received message) is fine: callers only read the view.
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if fmt == "bf16" else tensor


def npy_view(array) -> np.ndarray:
    """A read-only view of a Flower Array's .npy bytes; Array.numpy() copies them through np.load."""
    if array.stype != "numpy.ndarray":
        raise TypeError(f"array of serialization type {array.stype!r}, expected 'numpy.ndarray'")
    return npy_bytes_view(array.data)


def npy_bytes_view(data: bytes) -> np.ndarray:
    """A read-only view of the array that .npy bytes hold (no pickles, no copy)."""
    head = io.BytesIO(memoryview(data)[: 2**16 + 10])  # the longest version 1.0 header
    version = np.lib.format.read_magic(head)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(head)  # refuses object dtypes, as np.load without pickles does
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=head.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


def views(arrays: Mapping[str, np.ndarray], fmt: str) -> dict[str, torch.Tensor]:
    """Wire arrays as read-only torch tensors in their wire dtype, without copying: for copying into a model."""
    _check_format(fmt)
    return {name: _as_torch(name, a, fmt) for name, a in arrays.items()}


def is_finite(array: np.ndarray, fmt: str) -> bool:
    """Whether every value of one wire array is finite (bf16 checked on its int16 bits)."""
    _check_format(fmt)
    if fmt == "bf16":  # exponent bits all ones: inf or NaN
        return not ((np.asarray(array).view(np.uint16) & 0x7F80) == 0x7F80).any()
    return bool(np.isfinite(array).all())


def _add_scaled(acc: torch.Tensor, src: torch.Tensor, alpha: float, scratch: list[torch.Tensor]) -> None:
    """acc += alpha * src in fp32, bit for bit as acc.add_(src, alpha=alpha). Given a 16-bit src whole,
    add_ first converts it into a temporary fp32 copy the size of the model; through scratch[0] a
    chunk at a time, the peak stays one fp32 copy (acc) however many updates are added."""
    if src.dtype == torch.float32:
        acc.add_(src, alpha=alpha)
        return
    if scratch[0].numel() < min(_CHUNK, src.numel()):
        scratch[0] = torch.from_numpy(np.empty(min(_CHUNK, src.numel()), dtype=np.float32))
    for start in range(0, src.numel(), _CHUNK):
        part = src[start : start + _CHUNK]
        buf = scratch[0][: part.numel()]
        buf.copy_(part)  # exact: every fp16 and bf16 value is a float32 value
        acc[start : start + _CHUNK].add_(buf, alpha=alpha)


def aggregate(updates: list[tuple[Mapping[str, np.ndarray], float]], fmt: str) -> dict[str, np.ndarray]:
    """Weighted mean of wire-format updates, in float32, one tensor at a time.

    Each update is (arrays, weight), e.g. (wire arrays, samples trained). Only one float32 result
    per tensor is allocated: the inputs are added into it in place, one update at a time, scaled by
    their weight, so the peak is about one fp32 copy of the weights on top of the inputs, whatever
    their number. `arrays` may be any mapping whose values are produced on access, so replies need
    not be decoded up front.
    """
    _check_format(fmt)
    if not updates:
        raise ValueError("nothing to aggregate")
    total = float(sum(weight for _, weight in updates))
    if not total > 0:
        raise ValueError(f"update weights sum to {total}; they must be positive")
    first = updates[0][0]
    scratch = [torch.empty(0)]  # grown to the largest chunk on first use, then reused
    result = {}
    for name in first:
        shape = np.shape(first[name])
        out = np.zeros(shape, dtype=np.float32)
        acc = torch.from_numpy(out).view(-1)
        for arrays, weight in updates:
            src = _as_torch(name, arrays[name], fmt)
            if tuple(src.shape) != shape:  # add_ would broadcast a wrong shape silently
                raise ValueError(f"weight {name}: shape {tuple(src.shape)}, expected {shape}")
            _add_scaled(acc, src.reshape(-1), weight / total, scratch)
        result[name] = out
    return result


def down_format(fmt: str) -> str:
    """The format weights travel to the nodes in: int8-delta sends fp16 down."""
    return "fp16" if fmt == DELTA else fmt


def quantize_delta(delta: np.ndarray) -> dict[str, np.ndarray]:
    """A flat fp32 update as int8 values (padded to whole blocks) and one fp32 absmax/127 scale per block."""
    delta = np.asarray(delta, dtype=np.float32)
    blocks = -(-delta.size // DELTA_BLOCK)
    padded = np.zeros(blocks * DELTA_BLOCK, np.float32)
    padded[: delta.size] = delta
    padded = padded.reshape(blocks, DELTA_BLOCK)
    scales = np.abs(padded).max(axis=1) / 127.0
    safe = np.where(scales > 0, scales, 1.0)[:, None]
    values = np.clip(np.rint(padded / safe), -127, 127).astype(np.int8)
    return {PACKED: values.reshape(-1), SCALES: scales.astype(np.float32)}


def dequantize(arrays: Mapping[str, np.ndarray], size: int) -> np.ndarray:
    """An int8-delta reply's update as a flat fp32 array of `size` values."""
    values = np.asarray(arrays[PACKED]).reshape(-1, DELTA_BLOCK).astype(np.float32)
    values *= np.asarray(arrays[SCALES], dtype=np.float32)[:, None]
    return values.reshape(-1)[:size]


def aggregate_deltas(base: np.ndarray, updates: list[tuple[Mapping[str, np.ndarray], float]]) -> np.ndarray:
    """base (flat fp32) plus the weighted mean of int8-delta updates, a block row range at a time."""
    total = float(sum(weight for _, weight in updates))
    if not updates or not total > 0:
        raise ValueError(f"nothing to aggregate (total weight {total})")
    out = np.array(base, dtype=np.float32, copy=True)
    n, rows = out.size, 256  # rows of DELTA_BLOCK values dequantized at once: a few MiB of temporaries
    for arrays, weight in updates:
        values = np.asarray(arrays[PACKED]).reshape(-1, DELTA_BLOCK)
        scales = np.asarray(arrays[SCALES], dtype=np.float32) * np.float32(weight / total)
        if values.shape[0] != scales.size or values.size < n or values.size - n >= DELTA_BLOCK:
            raise ValueError(
                f"int8-delta update of {values.size} values and {scales.size} scales does not fit {n} weights"
            )
        for start in range(0, values.shape[0], rows):
            part = values[start : start + rows].astype(np.float32) * scales[start : start + rows, None]
            lo = start * DELTA_BLOCK
            out[lo : lo + part.size] += part.reshape(-1)[: max(0, min(part.size, n - lo))]
    return out
