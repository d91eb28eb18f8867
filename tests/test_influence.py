"""Bounded influence: a node's claimed samples, its share of the weights and the size of its update are limited."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from flwr.app import Message
from packed_replies import packed_reply

from zk0.server.influence import Limits, cap_shares
from zk0.server.records import RunRecorder
from zk0.server.strategy import Zk0FedProx
from zk0.settings import ServerSettings
from zk0.wire import DELTA, PACKED, SCALES, layout_fingerprint, pack, quantize_delta

SHAPES = {"b": (3,), "w": (2, 3)}
DEFAULTS = ServerSettings.load()
ROUND = 30 * 8  # local steps x batch size: what one round draws on an honest node


@pytest.fixture(autouse=True)
def _run_identity(monkeypatch):
    """Messages carry the run they belong to; inside a ServerApp Flower sets it, here we do."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)


def node_state(value: float, noise: int = 0) -> dict[str, torch.Tensor]:
    """Weights near `value` (noise: a seed for small per-node differences, on a 1/64 grid exact in fp16)."""
    rng = np.random.default_rng(noise)
    return {k: torch.from_numpy((value + rng.integers(-2, 3, size=s) / 64).astype(np.float32))
            for k, s in SHAPES.items()}


def reply(node_id: int, state: dict, samples: float, fmt: str, base: np.ndarray | None = None) -> Message:
    return packed_reply(node_id, state, samples, fmt, SHAPES, base)


def strategy(tmp_path, fmt: str = "fp16", **limits) -> Zk0FedProx:
    """Zk0FedProx with the ServerApp's default limits (overridden by `limits`), its round started from zeros."""
    defaults = dict(max_share=DEFAULTS.max_node_share, max_samples=ROUND, norm_factor=DEFAULTS.norm_bound_factor)
    s = Zk0FedProx(RunRecorder(tmp_path), lambda r: True, wire_format=fmt, proximal_mu=0.01,
                   weighted_by_key="num-samples", min_train_nodes=1, limits=Limits(**{**defaults, **limits}))
    s._shapes, s._layout = SHAPES, layout_fingerprint(SHAPES)
    s._base = pack({k: torch.zeros(v) for k, v in SHAPES.items()}, "fp32")
    return s


def test_the_defaults_leave_four_honest_nodes_untouched(tmp_path):
    """Honest nodes all claim steps x batch: no share reaches the cap, no update is far off, the mean is as before."""
    s = strategy(tmp_path)
    nodes = [node_state(1.0 + i / 8, noise=i) for i in range(4)]
    arrays, _ = s.aggregate_train(1, [reply(i + 1, n, ROUND, "fp16") for i, n in enumerate(nodes)])
    plain = strategy(tmp_path, max_share=None, max_samples=None, norm_factor=0)
    expected, _ = plain.aggregate_train(2, [reply(i + 1, n, ROUND, "fp16") for i, n in enumerate(nodes)])
    for key in SHAPES:
        np.testing.assert_array_equal(arrays[key].numpy(), expected[key].numpy())
    assert s.recorder.rounds[1]["clipped"] == {}


def test_a_node_claiming_a_million_samples_does_not_decide_the_model(tmp_path):
    honest = [node_state(1.0, noise=i) for i in range(3)]
    liar = {k: torch.full(v, 9.0) for k, v in SHAPES.items()}
    replies = [reply(i + 1, n, ROUND, "fp16") for i, n in enumerate(honest)] + [reply(4, liar, 1e6, "fp16")]
    unguarded, _ = strategy(tmp_path, max_share=None, max_samples=None, norm_factor=0).aggregate_train(1, replies)
    assert unguarded["w"].numpy().mean() > 8.9  # today's weighting: the claim takes the model
    s = strategy(tmp_path, norm_factor=0, node_frames={"node-4": 120})  # the claim check alone
    arrays, metrics = s.aggregate_train(1, replies)
    mean = np.mean([n["w"].numpy() for n in honest + [liar]], axis=0)  # the claim counts as one round's samples
    np.testing.assert_allclose(arrays["w"].numpy(), mean, rtol=1e-6)
    assert metrics["loss"] == pytest.approx((1 + 2 + 3 + 4) / 4)  # nor does it outweigh the others' metrics
    why = s.recorder.rounds[1]["clipped"]["4"]
    assert "claimed 1e+06 samples" in why and f"= {ROUND}" in why and "120 training frames" in why
    # The share cap alone (claims believed): the liar's weight is half, the rest shared by the honest three.
    s = strategy(tmp_path, max_samples=None, norm_factor=0)
    arrays, _ = s.aggregate_train(2, replies)
    capped = 0.5 * liar["w"].numpy() + 0.5 * np.mean([n["w"].numpy() for n in honest], axis=0)
    np.testing.assert_allclose(arrays["w"].numpy(), capped, rtol=1e-6)
    assert "capped at ZK0_MAX_NODE_SHARE = 0.5" in s.recorder.rounds[2]["clipped"]["4"]


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "fp32", DELTA])
def test_an_update_scaled_a_hundredfold_is_bounded_by_the_norm_screen(tmp_path, fmt):
    s = strategy(tmp_path, fmt)
    honest = [node_state(0.5, noise=i) for i in range(3)]
    attack = {k: 100 * v for k, v in node_state(0.5, noise=9).items()}
    replies = [reply(i + 1, n, ROUND, fmt, s._base) for i, n in enumerate(honest + [attack])]
    arrays, _ = s.aggregate_train(1, replies)
    norms = sorted(float(np.linalg.norm(pack(n, "fp32"))) for n in honest + [attack])
    median = (norms[1] + norms[2]) / 2  # the global model is zero: each update's norm is its weights'
    bounded = 3 * median / norms[3] * pack(attack, "fp32")
    expected = (sum(pack(n, "fp32") for n in honest) + bounded) / 4
    got = pack({k: torch.from_numpy(arrays[k].numpy()) for k in SHAPES}, "fp32")
    np.testing.assert_allclose(got, expected, rtol=0, atol=0.02 if fmt == DELTA else 1e-2 if fmt == "bf16" else 1e-5)
    assert float(np.linalg.norm(got)) < 3  # about 2.3; unbounded, the attack would put the mean near 38
    assert list(s.recorder.rounds[1]["clipped"]) == ["4"] and "ZK0_NORM_BOUND_FACTOR" in s.recorder.rounds[1][
        "clipped"]["4"]


def test_with_two_updates_nothing_is_clipped(tmp_path):
    s = strategy(tmp_path, "fp32")
    replies = [reply(1, node_state(0.5), ROUND, "fp32"), reply(2, node_state(50.0), ROUND, "fp32")]
    arrays, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["b"].numpy(), (node_state(0.5)["b"] + node_state(50.0)["b"]).numpy() / 2)
    assert s.recorder.rounds[1]["clipped"] == {}


@pytest.mark.parametrize("seed", range(20))
def test_capped_shares_sum_to_one_and_respect_the_cap(seed):
    rng = np.random.default_rng(seed)
    weights = rng.pareto(0.7, size=rng.integers(3, 9)) + 1e-3
    cap = rng.uniform(1 / len(weights) + 0.01, 1.0)
    shares = cap_shares(weights, cap)
    assert shares.sum() == pytest.approx(1.0) and shares.max() <= cap * (1 + 1e-9)
    uncapped = shares < cap * (1 - 1e-9)  # the rest keep their proportions to one another
    ratio = shares[uncapped] / weights[uncapped]
    np.testing.assert_allclose(ratio, ratio[0] if ratio.size else ratio)


def test_a_cap_that_cannot_hold_gives_equal_shares():
    np.testing.assert_allclose(cap_shares([1.0, 100.0], 0.4), [0.5, 0.5])
    np.testing.assert_allclose(cap_shares([1.0, 3.0], 1.0), [0.25, 0.75])  # 1 = off


def test_int8_delta_scales_do_not_hide_an_update(tmp_path):
    """The norm of an int8-delta reply is read from its values and scales, as the server will add it."""
    from zk0.server.influence import update_norm

    delta = np.linspace(-3, 3, 5000).astype(np.float32)
    arrays = quantize_delta(delta)
    assert set(arrays) == {PACKED, SCALES}
    assert update_norm(arrays, np.zeros(5000, np.float32), DELTA) == pytest.approx(np.linalg.norm(delta), rel=1e-2)


@pytest.mark.parametrize("claim", [-1e6, 0, float("nan")])
def test_a_claim_that_is_no_positive_count_is_excluded(tmp_path, claim):
    """A negative weight would subtract the node's update from the others'; NaN would poison every weight."""
    s = strategy(tmp_path)
    replies = [reply(i + 1, node_state(1.0, noise=i), ROUND, "fp16") for i in range(3)]
    replies.append(reply(4, node_state(-50.0), claim, "fp16"))
    arrays, _ = s.aggregate_train(1, replies)
    assert s.recorder.rounds[1]["contributors"] == [1, 2, 3]
    assert "num-samples" in s.recorder.rounds[1]["excluded"]["4"] and arrays["w"].numpy().min() > 0.9


def test_the_same_replies_in_any_arrival_order_give_the_same_bits(tmp_path):
    """Flower hands replies over in arrival order, which varies from run to run, and float sums are not associative:
    the strategy sums them in node order, so a run's model does not depend on which node answered first."""
    rng = np.random.default_rng(0)
    nodes = [{k: torch.from_numpy(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()} for _ in range(4)]
    samples = [240.0, 80.0, 160.0, 120.0]
    results = set()
    for order in itertools.permutations(range(4)):
        arrays, _ = strategy(tmp_path, "fp32").aggregate_train(1, [reply(i + 1, nodes[i], samples[i], "fp32")
                                                                   for i in order])
        results.add(b"".join(arrays[k].numpy().tobytes() for k in SHAPES))
    assert len(results) == 1
