"""The strategy's aggregation: sample-weighted fp32 mean of 16-bit replies, bad updates excluded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from zk0.server.records import RunRecorder
from zk0.server.strategy import Zk0FedProx
from zk0.wire import DELTA, PACKED, layout_fingerprint, pack, quantize_delta, unpack


@pytest.fixture(autouse=True)
def _run_identity(monkeypatch):
    """Messages carry the run they belong to; inside a ServerApp Flower sets it, here we do."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)


def reply(node_id: int, state: dict, samples: int, fmt: str) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    layout = layout_fingerprint({k: tuple(v.shape) for k, v in state.items()})
    content = RecordDict({
        "arrays": ArrayRecord({PACKED: Array(pack(state, fmt))}),
        "metrics": MetricRecord({"num-samples": samples, "loss": float(node_id)}),
        "node": ConfigRecord({"name": f"node-{node_id}", "dataset": f"/data/{node_id}", "layout": layout}),
    })
    return Message(content=content, reply_to=request)


@pytest.fixture
def strategy(tmp_path):
    s = Zk0FedProx(
        RunRecorder(tmp_path), lambda r: True, wire_format="fp16", proximal_mu=0.1, weighted_by_key="num-samples",
        min_train_nodes=1,
    )
    s._shapes = {"w": (2, 3), "b": (3,)}
    s._layout = layout_fingerprint(s._shapes)
    return s


def state(value: float) -> dict:
    return {"w": torch.full((2, 3), value), "b": torch.full((3,), -value)}


def test_updates_are_weighted_by_samples_trained(strategy):
    replies = [reply(1, state(1.0), 10, "fp16"), reply(2, state(4.0), 30, "fp16")]
    arrays, metrics = strategy.aggregate_train(1, replies)
    merged = arrays.to_torch_state_dict()
    assert merged["w"].dtype == torch.float32
    torch.testing.assert_close(merged["w"], torch.full((2, 3), (1.0 * 10 + 4.0 * 30) / 40))
    torch.testing.assert_close(merged["b"], torch.full((3,), -(1.0 * 10 + 4.0 * 30) / 40))
    assert metrics["loss"] == pytest.approx((1 * 10 + 2 * 30) / 40)
    record = strategy.recorder.rounds[1]
    assert record["contributors"] == [1, 2] and record["excluded"] == {}
    assert {c["name"] for c in record["clients"].values()} == {"node-1", "node-2"}


def test_non_finite_and_misshapen_updates_are_excluded_and_named(strategy):
    bad = state(2.0)
    bad["w"][0, 0] = float("nan")
    wrong = {"w": torch.zeros(3, 2), "b": torch.zeros(3)}  # as many values, another layout
    short = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
    replies = [reply(i + 1, s, 10, "fp16") for i, s in enumerate([state(1.0), bad, wrong, short])]
    arrays, _ = strategy.aggregate_train(1, replies)
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], torch.full((2, 3), 1.0))
    record = strategy.recorder.rounds[1]
    assert record["contributors"] == [1]
    excluded = record["excluded"]
    assert "NaN" in excluded["2"] and "shapes" in excluded["3"] and "shapes" in excluded["4"]


def test_a_round_with_fewer_usable_updates_than_required_fails_the_run_with_every_reason(strategy):
    from zk0.errors import RunFailed

    strategy.min_train_nodes = 2
    strategy._sent = {1, 2, 3}  # node 3 was asked and never answered
    bad = state(2.0)
    bad["b"][0] = float("inf")
    with pytest.raises(RunFailed) as err:
        strategy.aggregate_train(1, [reply(1, state(1.0), 10, "fp16"), reply(2, bad, 10, "fp16")])
    assert "1 usable update(s), ZK0_MIN_NODES=2" in str(err.value)
    assert "node 2: weights contain NaN or Inf" in str(err.value) and "node 3: no reply" in str(err.value)
    record = strategy.recorder.rounds[1]
    assert record["contributors"] == [1] and set(record["excluded"]) == {"2", "3"}


def test_global_model_travels_in_16_bits(strategy, tmp_path):
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in state(0.123456).items()})
    config = ConfigRecord({})
    wire = strategy._to_wire(arrays, config)
    # One packed array per message, whatever the number of tensors; its layout travels in the config.
    assert list(wire) == [PACKED] and wire[PACKED].numpy().dtype == np.float16
    assert config["weights-layout"] == layout_fingerprint(strategy._shapes)
    unpacked = unpack(wire[PACKED].numpy(), strategy._shapes)
    assert abs(float(unpacked["w"][0, 0]) - 0.123456) < 1e-4
    assert float(unpacked["b"][0]) == pytest.approx(-0.123456, abs=1e-4)


def test_int8_delta_replies_are_added_to_the_global_model(tmp_path):
    s = Zk0FedProx(RunRecorder(tmp_path), lambda r: True, wire_format=DELTA, proximal_mu=0.1,
                   weighted_by_key="num-samples")
    s._shapes = {"w": (2, 3), "b": (3,)}
    s._layout = layout_fingerprint(s._shapes)
    s._base = pack(state(1.0), "fp32")
    layout = s._layout

    def delta_reply(node_id, value, samples):
        request = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
        arrays = quantize_delta(pack(state(value), "fp32") - s._base)
        return Message(content=RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-samples": samples, "loss": 0.0}),
            "node": ConfigRecord({"name": f"node-{node_id}", "dataset": "d", "layout": layout}),
        }), reply_to=request)

    arrays, _ = s.aggregate_train(1, [delta_reply(1, 2.0, 10), delta_reply(2, 4.0, 30)])
    merged = arrays.to_torch_state_dict()
    torch.testing.assert_close(merged["w"], torch.full((2, 3), 3.5), rtol=0, atol=0.02)
    torch.testing.assert_close(merged["b"], torch.full((3,), -3.5), rtol=0, atol=0.02)
    # Down the wire the global model still travels as fp16 weights.
    wire = s._to_wire(ArrayRecord({k: Array(v.numpy()) for k, v in state(1.0).items()}), ConfigRecord({}))
    assert wire[PACKED].numpy().dtype == np.float16


def test_evaluations_sent_with_training_are_recorded_for_the_model_they_evaluated(strategy):
    """ZK0_EVAL_MODE=in-train: round 2's train replies carry the nodes' evaluation of the model after round 1."""
    strategy.eval_in_train, strategy.last_round = True, 3
    told = []
    strategy.after_node_eval = told.append
    replies = [reply(1, state(1.0), 10, "fp16"), reply(2, state(4.0), 30, "fp16")]
    for msg, (loss, samples) in zip(replies, [(1.0, 4), (3.0, 12)], strict=True):
        msg.content["eval"] = ConfigRecord({"policy_loss": loss, "num-samples": float(samples), "eval_seconds": 0.5})
    strategy.aggregate_train(2, replies)
    before, now = strategy.recorder.rounds[1], strategy.recorder.rounds[2]
    assert told == [1] and before["node_eval_in"] == "train"
    assert before["eval_aggregate"]["policy_loss"] == pytest.approx((1.0 * 4 + 3.0 * 12) / 16)
    assert {c["name"]: c["eval"]["policy_loss"] for c in before["clients"].values()} == {"node-1": 1.0, "node-2": 3.0}
    assert all("eval" not in c and "train" in c for c in now["clients"].values())
    # A resumed experiment's restarted SuperNodes have new ids: the evaluation goes to the node of the same name.
    again = reply(7, state(1.0), 10, "fp16")
    again.content["node"]["name"] = "node-1"
    again.content["eval"] = ConfigRecord({"policy_loss": 5.0, "num-samples": 4.0})
    strategy.aggregate_train(2, [again])
    assert set(before["clients"]) == {"1", "2"} and before["clients"]["1"]["eval"]["policy_loss"] == 5.0
    # No evaluate message but for the last round's model, which no train message brings.
    assert strategy.configure_evaluate(2, ArrayRecord(), ConfigRecord({}), None) == []


def test_a_resumed_run_records_rounds_after_its_checkpoint(tmp_path):
    """Flower counts a restarted run's rounds from 1; every hook sees, and records, the experiment's round."""
    asked = []
    s = Zk0FedProx(RunRecorder(tmp_path), lambda r: asked.append(r) or False, round_offset=3, proximal_mu=0.1,
                   weighted_by_key="num-samples")
    assert s.experiment_round(1) == 4
    assert s.configure_evaluate(2, ArrayRecord(), ConfigRecord({}), None) == [] and asked == [5]
    s.aggregate_evaluate(2, [])
    assert list(s.recorder.rounds) == [5]


def test_statistics_travel_beside_the_config_and_reach_the_node_unchanged(tmp_path):
    """Flower logs the config at start: it holds the statistics' digest, the message the statistics themselves."""
    from zk0.bench.scale_agg import _Fleet
    from zk0.node.client_app import to_request
    from zk0.stats import DIGEST_KEY, STATS_KEY, digest

    stats = '{"action": {"mean": [' + ", ".join(["0.125"] * 500) + "]}}"
    s = Zk0FedProx(RunRecorder(tmp_path), lambda r: True, proximal_mu=0.1, weighted_by_key="num-samples",
                   min_train_nodes=2, min_available_nodes=2, stats=lambda: stats)
    config = ConfigRecord({DIGEST_KEY: digest(stats), "seed": 0})
    messages = s.configure_train(1, ArrayRecord(state(1.0)), config, _Fleet(2))
    assert len(messages) == 2 and len(str(config)) < 200
    for msg in messages:
        assert STATS_KEY not in msg.content["config"]
        assert to_request("train", msg, {}).config[STATS_KEY] == stats
    messages[0].content[STATS_KEY] = ConfigRecord({"json": stats.replace("0.125", "0.5", 1)})
    with pytest.raises(ValueError, match="do not match the digest"):
        to_request("train", messages[0], {})
    # Before the statistics are merged nothing travels beside the config, and the node uses the base policy's.
    plain = Zk0FedProx(RunRecorder(tmp_path), lambda r: True, proximal_mu=0.1, weighted_by_key="num-samples",
                       min_train_nodes=2, min_available_nodes=2)
    msg = plain.configure_train(1, ArrayRecord(state(1.0)), ConfigRecord({DIGEST_KEY: ""}), _Fleet(2))[0]
    assert STATS_KEY not in msg.content and to_request("train", msg, {}).config.get(STATS_KEY) is None
