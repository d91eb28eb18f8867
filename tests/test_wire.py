"""The 16-bit wire format of trainable weights and the server's streaming aggregation.

Per-tensor arrays (zk0.bench.wire_tensors, packing's baseline) probe each format's conversion tensor by tensor.
"""

import numpy as np
import pytest
import torch

from zk0 import wire
from zk0.bench.wire_tensors import decode, encode, wire_bytes


@pytest.fixture
def state():
    g = torch.Generator().manual_seed(0)
    return {
        "expert.weight": 0.02 * torch.randn(64, 32, generator=g),
        "expert.bias": torch.linspace(-3.0, 3.0, 33),
        "scale": torch.tensor(1.5),  # a 0-d tensor must keep its shape
        "tiny": torch.tensor([1e-8, -1e-6, 3e-5]),  # below fp16's normal range
    }


def test_fp32_round_trip_is_exact_and_independent(state):
    arrays = encode(state, "fp32")
    assert all(a.dtype == np.float32 for a in arrays.values())
    back = decode(arrays, "fp32")
    for name, value in state.items():
        assert torch.equal(back[name], value) and back[name].shape == value.shape
    state["expert.weight"].add_(1.0)  # neither the arrays nor the decoded tensors alias the input
    assert not np.allclose(arrays["expert.weight"], state["expert.weight"].numpy())
    arrays["scale"][...] = 0
    assert back["scale"].item() == 1.5


def test_bf16_travels_as_int16_and_matches_torch_bf16_bit_for_bit(state):
    arrays = encode(state, "bf16")
    assert all(a.dtype == np.int16 and a.shape == tuple(state[k].shape) for k, a in arrays.items())
    back = decode(arrays, "bf16")
    for name, value in state.items():
        expected = value.to(torch.bfloat16).float()
        assert back[name].dtype == torch.float32
        assert torch.equal(back[name], expected), name


def test_bf16_keeps_inf_and_nan_for_the_server_to_screen():
    arrays = encode({"w": torch.tensor([1.0, float("inf"), float("nan")])}, "bf16")
    back = decode(arrays, "bf16")["w"]
    assert back[0] == 1.0 and torch.isinf(back[1]) and torch.isnan(back[2])
    assert not wire.is_finite(arrays["w"], "bf16")
    assert wire.is_finite(encode({"w": torch.tensor([1e38, -3.0])}, "bf16")["w"], "bf16")


def test_fp16_error_is_within_half_an_ulp(state):
    arrays = encode(state, "fp16")
    assert all(a.dtype == np.float16 for a in arrays.values())
    back = decode(arrays, "fp16")
    w = state["expert.weight"]
    err = (back["expert.weight"] - w).abs()
    # 10 mantissa bits: relative error at most 2^-11 for normal values (weights of scale 0.02);
    # below 6.1e-5 fp16 is subnormal, with an absolute error of at most half its smallest step, 2^-25.
    assert (err <= torch.clamp(w.abs() * 2**-11, min=2**-25)).all()
    assert 0 < err.max() < 1e-4
    assert (back["tiny"] - state["tiny"]).abs().max() <= 2**-25


def test_fp16_refuses_a_finite_value_beyond_its_range_and_names_the_tensor():
    with pytest.raises(ValueError, match=r"weight layer\.7\.weight.*fp16 range"):
        encode({"ok": torch.ones(3), "layer.7.weight": torch.tensor([1.0, -7e4])}, "fp16")
    # The largest fp16 value still travels; an inf that was already there is the server's to drop.
    assert encode({"w": torch.tensor([65504.0])}, "fp16")["w"][0] == 65504
    assert np.isinf(encode({"w": torch.tensor([float("inf")])}, "fp16")["w"][0])
    # bf16 has fp32's range: the same value travels there.
    assert decode(encode({"w": torch.tensor([-7e4])}, "bf16"), "bf16")["w"].item() == pytest.approx(-7e4, rel=4e-3)


def test_decode_rejects_arrays_of_another_format(state):
    with pytest.raises(ValueError, match="expert.weight: dtype float32"):
        decode(encode(state, "fp32"), "bf16")
    with pytest.raises(ValueError, match="unknown wire format"):
        encode(state, "int8")


def test_wire_bytes_halves_in_16_bit(state):
    n = sum(v.numel() for v in state.values())
    assert wire_bytes(encode(state, "fp32")) == 4 * n
    assert wire_bytes(encode(state, "fp16")) == wire_bytes(encode(state, "bf16")) == 2 * n


@pytest.mark.parametrize("fmt", wire.FORMATS)
def test_aggregate_equals_a_float64_weighted_mean(state, fmt):
    g = torch.Generator().manual_seed(1)
    models = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()} for _ in range(4)]
    weights = [160.0, 240.0, 200.0, 80.0]
    updates = [(encode(m, fmt), w) for m, w in zip(models, weights, strict=True)]
    merged = wire.aggregate(updates, fmt)
    for name in state:
        received = [decode({name: u[name]}, fmt)[name].double() for u, _ in updates]
        expected = sum(w * r for w, r in zip(weights, received, strict=True)) / sum(weights)
        assert merged[name].dtype == np.float32 and merged[name].shape == tuple(state[name].shape)
        np.testing.assert_allclose(merged[name], expected.numpy(), rtol=1e-6, atol=1e-7)


def test_aggregate_rejects_mismatched_shapes_and_bad_weights(state):
    good = encode(state, "fp16")
    bad = dict(good, scale=np.ones(1, dtype=np.float16))  # would broadcast silently
    with pytest.raises(ValueError, match="scale: shape"):
        wire.aggregate([(good, 1.0), (bad, 1.0)], "fp16")
    with pytest.raises(ValueError, match="sum to 0"):
        wire.aggregate([(good, 0.0)], "fp16")
    with pytest.raises(ValueError, match="nothing"):
        wire.aggregate([], "fp16")


def test_aggregate_reads_read_only_arrays_without_changing_them(state):
    arrays = encode(state, "bf16")
    for a in arrays.values():
        a.flags.writeable = False
    before = {k: a.copy() for k, a in arrays.items()}
    merged = wire.aggregate([(arrays, 1.0), (arrays, 3.0)], "bf16")
    assert all(np.array_equal(arrays[k], before[k]) for k in arrays)
    np.testing.assert_array_equal(merged["scale"], np.float32(1.5))


@pytest.mark.parametrize("fmt", wire.FORMATS)
def test_received_views_load_into_a_model_as_decode_does(state, fmt):
    # The node copies the message's bytes straight into its parameters, skipping np.load and fp32 copies.
    from flwr.app import Array

    arrays = encode(state, fmt)
    received = {k: wire.npy_view(Array(a)) for k, a in arrays.items()}
    views = wire.views(received, fmt)
    decoded = decode(arrays, fmt)
    for name, value in state.items():
        target = torch.empty_like(value)
        target.copy_(views[name])
        assert torch.equal(target, decoded[name]) and target.shape == value.shape, name
        assert not received[name].flags.writeable  # a view of the message, not a copy


@pytest.mark.parametrize("fmt", wire.FORMATS)
def test_packed_weights_unpack_to_what_per_tensor_encoding_gives(fmt):
    g = torch.Generator().manual_seed(0)
    state = {"z.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(5, generator=g),
             "m.scale": torch.tensor(0.5)}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    flat = wire.pack(state, fmt)
    assert flat.ndim == 1 and flat.size == 18 and flat.dtype == encode(state, fmt)["a.bias"].dtype
    unpacked = decode(wire.unpack(flat, shapes), fmt)
    for name, expected in decode(encode(state, fmt), fmt).items():
        assert torch.equal(unpacked[name], expected), name
    # The layout is the names and shapes, whatever order a mapping lists them in.
    assert wire.layout_fingerprint(shapes) == wire.layout_fingerprint(dict(reversed(shapes.items())))
    assert wire.layout_fingerprint(shapes) != wire.layout_fingerprint({**shapes, "z.weight": (3, 4)})


def test_packed_weights_of_the_wrong_size_are_refused():
    with pytest.raises(ValueError, match="packed weights hold 5 values.*needs 6"):
        wire.unpack(np.zeros(5, np.float16), {"w": (2, 3)})
    with pytest.raises(ValueError, match="weight w: max .*exceeds the fp16 range"):
        wire.pack({"w": torch.tensor([7e4])}, "fp16")


def test_int8_delta_updates_add_up_to_the_weighted_mean_within_a_percent():
    rng = np.random.default_rng(0)
    n = 3 * wire.DELTA_BLOCK + 17  # a partial last block
    base = rng.normal(0, 0.03, n).astype(np.float32)
    deltas = [(rng.normal(0, 1e-3, n).astype(np.float32), w) for w in (1.0, 3.0)]
    exact = base + (deltas[0][0] * 1.0 + deltas[1][0] * 3.0) / 4.0
    sent = [(wire.quantize_delta(d), w) for d, w in deltas]
    assert sent[0][0][wire.PACKED].dtype == np.int8 and sent[0][0][wire.PACKED].size == 4 * wire.DELTA_BLOCK
    merged = wire.aggregate_deltas(base, sent)
    update = exact - base
    assert np.sqrt(np.mean((merged - exact) ** 2)) < 0.01 * np.sqrt(np.mean(update**2))
    assert not np.shares_memory(merged, base)
    with pytest.raises(ValueError, match="does not fit"):
        wire.aggregate_deltas(base[: n - wire.DELTA_BLOCK], sent)
