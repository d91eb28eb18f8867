"""ZK0_AGGREGATION: Flower's own robust rules on zk0's packed, screened replies, in every wire format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum
from packed_replies import packed_reply

from zk0.server.influence import dequantize
from zk0.server.records import RunRecorder
from zk0.server.robust import robust_rule
from zk0.server.server_opt import Zk0ServerOpt, server_optimizer
from zk0.server.strategy import Zk0FedProx
from zk0.settings import ServerSettings, SettingsError
from zk0.wire import DELTA, layout_fingerprint, pack, quantize_delta, unpack

SHAPES = {"b": (3,), "w": (4, 5)}
CLAIMS = (10, 30, 20, 40, 25, 15, 35)  # seven nodes: Bulyan with f = 1 needs 4f + 3
# (ZK0_AGGREGATION and its settings, Flower's class and its arguments for the same values)
CASES = [
    ({"aggregation": "median"}, FedMedian, {}),
    ({"aggregation": "trimmed", "trim_fraction": 0.3}, FedTrimmedAvg, {"beta": 0.3}),
    ({"aggregation": "krum", "byzantine_nodes": 2}, Krum, {"num_malicious_nodes": 2}),
    ({"aggregation": "multikrum", "byzantine_nodes": 1, "multikrum_select": 3}, MultiKrum,
     {"num_malicious_nodes": 1, "num_nodes_to_select": 3}),
    ({"aggregation": "bulyan", "byzantine_nodes": 1}, Bulyan, {"num_malicious_nodes": 1}),
]
IDS = [c[0]["aggregation"] for c in CASES]


@pytest.fixture(autouse=True)
def _run_identity(monkeypatch):
    """Messages carry the run they belong to; inside a ServerApp Flower sets it, here we do."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)


def grid_state(seed: int, spread: float = 1.0) -> dict[str, np.ndarray]:
    """fp32 weights on a 1/64 grid in [-spread, spread] (at most 2): exact in fp16 and bf16, so the wire loses
    nothing."""
    rng, top = np.random.default_rng(seed), min(128, round(64 * spread))
    return {k: (rng.integers(-top, top + 1, size=s) / 64).astype(np.float32) for k, s in SHAPES.items()}


def zk0_reply(node_id: int, state: dict, samples: int, fmt: str, base: np.ndarray) -> Message:
    return packed_reply(node_id, state, samples, fmt, SHAPES, base)


def flower_reply(node_id: int, state: dict, samples: int) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v.copy()) for k, v in state.items()}),
                          "metrics": MetricRecord({"num-samples": samples, "loss": float(node_id)})})
    return Message(content=content, reply_to=request)


def as_received(state: dict, fmt: str, base: np.ndarray) -> dict[str, np.ndarray]:
    """What the server holds of a node's weights: int8-delta's quantised update added to the global model."""
    if fmt != DELTA:
        return state
    flat = pack({k: torch.from_numpy(v) for k, v in state.items()}, "fp32")
    return unpack(base + dequantize(quantize_delta(flat - base), base.size), SHAPES)


def zk0_strategy(tmp_path, fmt: str, settings: ServerSettings, optimizer=None) -> Zk0FedProx:
    """The strategy as the ServerApp builds it for `settings`, bounded-influence limits off (compared alone here)."""
    kwargs = dict(wire_format=fmt, proximal_mu=0.01, weighted_by_key="num-samples", min_train_nodes=2,
                  rule=robust_rule(settings))
    s = (Zk0FedProx(RunRecorder(tmp_path), lambda r: True, **kwargs) if optimizer is None
         else Zk0ServerOpt(optimizer, RunRecorder(tmp_path), lambda r: True, **kwargs))
    s._shapes, s._layout = SHAPES, layout_fingerprint(SHAPES)
    s._base = pack({k: torch.from_numpy(v) for k, v in grid_state(99, 0.5).items()}, "fp32")
    return s


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "fp32", DELTA])
@pytest.mark.parametrize(("ours", "flower_cls", "flower_args"), CASES, ids=IDS)
def test_each_rule_is_flowers_own_on_the_same_updates(tmp_path, fmt, ours, flower_cls, flower_args):
    settings = ServerSettings.load(min_nodes=len(CLAIMS), **ours)
    zk0 = zk0_strategy(tmp_path, fmt, settings)
    # Five similar nodes and two far off: the rules disagree with the mean, and with one another.
    nodes = [grid_state(s, 0.2) for s in range(5)] + [grid_state(s, 2.0) for s in (7, 8)]
    replies = [zk0_reply(i + 1, n, c, fmt, zk0._base) for i, (n, c) in enumerate(zip(nodes, CLAIMS, strict=True))]
    ours_arrays, ours_metrics = zk0.aggregate_train(1, replies)
    flower = flower_cls(**flower_args, weighted_by_key="num-samples")
    received = [as_received(n, fmt, zk0._base) for n in nodes]
    plain = [flower_reply(i + 1, n, c) for i, (n, c) in enumerate(zip(received, CLAIMS, strict=True))]
    theirs, their_metrics = flower.aggregate_train(1, plain)
    for key in SHAPES:
        assert ours_arrays[key].numpy().dtype == np.float32
        np.testing.assert_allclose(ours_arrays[key].numpy(), theirs[key].numpy(), rtol=1e-6, atol=1e-6)
    assert ours_metrics["loss"] == pytest.approx(their_metrics["loss"])
    mean = sum(c * n["w"] for n, c in zip(nodes, CLAIMS, strict=True)) / sum(CLAIMS)
    assert not np.allclose(ours_arrays["w"].numpy(), mean, atol=1e-3)  # a rule that fell back to the mean fails


def test_a_server_optimiser_steps_on_the_robust_result(tmp_path):
    """ZK0_STRATEGY=fedavgm (rate 1, no momentum) on ZK0_AGGREGATION=median: the median itself; mu still goes out."""
    settings = ServerSettings.load(min_nodes=3, aggregation="median", strategy="fedavgm", server_learning_rate=1.0)
    zk0 = zk0_strategy(tmp_path, "fp16", settings, optimizer=server_optimizer(settings))
    start = ArrayRecord({k: Array(v) for k, v in grid_state(99, 0.5).items()})
    messages = list(zk0.configure_train(1, start, ConfigRecord({}), _grid(3)))
    assert messages[0].content["config"]["proximal-mu"] == 0.01
    nodes = [grid_state(s) for s in range(3)]
    arrays, _ = zk0.aggregate_train(1, [zk0_reply(i + 1, n, 10, "fp16", zk0._base) for i, n in enumerate(nodes)])
    for key in SHAPES:
        np.testing.assert_allclose(arrays[key].numpy(), np.median([n[key] for n in nodes], axis=0), atol=1e-6)


def _grid(n: int):
    from zk0.bench.scale_agg import _Fleet

    return _Fleet(n)


def test_mean_is_the_default_and_needs_no_flower_rule():
    assert ServerSettings.load().aggregation == "mean" and robust_rule(ServerSettings.load()) is None


@pytest.mark.parametrize(("ours", "flower_cls", "flower_args"), CASES, ids=IDS)
def test_unset_hyper_parameters_keep_flowers_defaults(ours, flower_cls, flower_args):
    rule = robust_rule(ServerSettings.load(min_nodes=7, aggregation=ours["aggregation"]))
    default = flower_cls(weighted_by_key="num-samples")
    assert type(rule) is flower_cls and vars(rule).keys() == vars(default).keys()
    for name in ("beta", "num_malicious_nodes", "num_nodes_to_select"):
        assert getattr(rule, name, None) == getattr(default, name, None), name


def test_rules_that_cannot_work_are_refused_together_naming_each_variable():
    with pytest.raises(SettingsError) as err:
        ServerSettings.load(aggregation="bulyan", byzantine_nodes=1, min_nodes=4, trim_fraction=0.1,
                            norm_bound_factor=0.5)
    text = str(err.value)
    assert "ZK0_TRIM_FRACTION: not used by ZK0_AGGREGATION=bulyan" in text
    assert "needs at least 7 updates a round, ZK0_MIN_NODES=4" in text and "ZK0_BYZANTINE_NODES" in text
    assert "ZK0_NORM_BOUND_FACTOR=0.5" in text
    with pytest.raises(SettingsError, match="ZK0_AGGREGATION=krum with ZK0_BYZANTINE_NODES=0 needs at least 3"):
        ServerSettings.load(aggregation="krum", min_nodes=2)
    with pytest.raises(SettingsError, match="ZK0_MULTIKRUM_SELECT=5 is above"):
        ServerSettings.load(aggregation="multikrum", byzantine_nodes=1, multikrum_select=5, min_nodes=5)
    with pytest.raises(SettingsError) as err:
        ServerSettings.load(aggregation="median", trim_fraction=0.6, max_node_share=0)
    assert "ZK0_TRIM_FRACTION" in str(err.value) and "ZK0_MAX_NODE_SHARE" in str(err.value)
    with pytest.raises(SettingsError, match="ZK0_AGGREGATION.*'krumm'"):
        ServerSettings.load(aggregation="krumm")
