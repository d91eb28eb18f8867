"""Server optimisers (ZK0_STRATEGY): Flower's own FedAvgM/FedAdam/FedYogi/FedAdagrad step on zk0's mean."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedProx, FedYogi

from zk0.bench.scale_agg import _Fleet
from zk0.server.records import RunRecorder
from zk0.server.server_opt import Zk0ServerOpt, server_optimizer
from zk0.server.strategy import Zk0FedProx
from zk0.settings import ServerSettings, SettingsError
from zk0.wire import PACKED, layout_fingerprint, pack

SHAPES = {"b": (3,), "w": (2, 3)}
SAMPLES = (10, 30)  # weights 1/4 and 3/4: with values on a 1/64 grid both means are exact in fp32
# (ZK0_STRATEGY, zk0 settings, Flower's class and its arguments for the same values)
CASES = [
    ("fedavgm", {"server_learning_rate": 0.5, "server_momentum": 0.9}, FedAvgM,
     {"server_learning_rate": 0.5, "server_momentum": 0.9}),
    ("fedadam", {"server_learning_rate": 0.05, "server_beta_1": 0.8, "server_beta_2": 0.95, "server_tau": 1e-2},
     FedAdam,
     {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2}),
    ("fedyogi", {"server_learning_rate": 0.02, "server_beta_1": 0.7, "server_beta_2": 0.9, "server_tau": 1e-2}, FedYogi,
     {"eta": 0.02, "beta_1": 0.7, "beta_2": 0.9, "tau": 1e-2}),
    ("fedadagrad", {"server_learning_rate": 0.1, "server_tau": 1e-2}, FedAdagrad, {"eta": 0.1, "tau": 1e-2}),
]


@pytest.fixture(autouse=True)
def _run_identity(monkeypatch):
    """Messages carry the run they belong to; inside a ServerApp Flower sets it, here we do."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)


def grid_state(seed: int) -> dict[str, np.ndarray]:
    """fp32 weights on a 1/64 grid in [-2, 2]: exact in fp16, so the wire loses nothing."""
    rng = np.random.default_rng(seed)
    return {k: (rng.integers(-128, 129, size=s) / 64).astype(np.float32) for k, s in SHAPES.items()}


def records(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.copy()) for k, v in state.items()})


def zk0_reply(request: Message, state: dict[str, np.ndarray], samples: int) -> Message:
    """A node's reply as zk0 sends it: packed fp16 weights, its layout, its metrics."""
    content = RecordDict({
        "arrays": ArrayRecord({PACKED: Array(pack({k: torch.from_numpy(v) for k, v in state.items()}, "fp16"))}),
        "metrics": MetricRecord({"num-samples": samples, "loss": 1.0}),
        "node": ConfigRecord({"name": f"node-{request.metadata.dst_node_id}", "dataset": "d",
                              "layout": layout_fingerprint(SHAPES)}),
    })
    return Message(content=content, reply_to=request)


def flower_reply(request: Message, state: dict[str, np.ndarray], samples: int) -> Message:
    """The same update as a plain Flower FedAvg-style reply: named fp32 arrays and a weight."""
    content = RecordDict({"arrays": records(state), "metrics": MetricRecord({"num-samples": samples, "loss": 1.0})})
    return Message(content=content, reply_to=request)


def zk0_strategy(tmp_path, name: str, round_offset: int = 0, **settings) -> Zk0ServerOpt:
    optimizer = server_optimizer(ServerSettings.load(strategy=name, **settings))
    return Zk0ServerOpt(
        optimizer, RunRecorder(tmp_path), lambda r: True, wire_format="fp16", proximal_mu=0.01,
        weighted_by_key="num-samples", min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2,
        round_offset=round_offset,
    )


def play_round(strategy, server_round: int, global_state: ArrayRecord, nodes: list[dict], make_reply) -> tuple:
    """configure_train to two nodes, their replies, aggregate_train: the new global model, metrics, the config sent."""
    fleet = _Fleet(2)
    messages = list(strategy.configure_train(server_round, global_state, ConfigRecord({}), fleet))
    fleet.push(messages)
    replies = [make_reply(m, state, n) for m, state, n in zip(messages, nodes, SAMPLES, strict=True)]
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return arrays, metrics, messages[0].content["config"]


def as_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


@pytest.mark.parametrize(("name", "settings", "flower_cls", "flower_args"), CASES, ids=[c[0] for c in CASES])
def test_the_server_step_is_flowers_over_two_rounds(tmp_path, name, settings, flower_cls, flower_args):
    # A resumed run: records say round 5, the optimiser's own count starts at 1 as Flower's does.
    zk0 = zk0_strategy(tmp_path, name, round_offset=4, **settings)
    flower = flower_cls(**flower_args, weighted_by_key="num-samples", min_train_nodes=2, min_available_nodes=2)
    global_state = records(grid_state(0))
    for server_round, seeds in ((1, (1, 2)), (2, (3, 4))):
        nodes = [grid_state(s) for s in seeds]
        ours, metrics, config = play_round(zk0, server_round, global_state, nodes, zk0_reply)
        theirs, their_metrics, _ = play_round(flower, server_round, global_state, nodes, flower_reply)
        assert config["proximal-mu"] == 0.01  # the nodes' FedProx term goes out whatever the server step
        assert metrics["loss"] == their_metrics["loss"] == 1.0
        assert {k: v.dtype for k, v in ours.items()} == {k: "float32" for k in SHAPES}
        for key, value in as_numpy(theirs).items():
            np.testing.assert_allclose(ours[key].numpy(), value, rtol=1e-6, atol=0)
        assert zk0.recorder.rounds[server_round + 4]["contributors"] == [1, 2]
        global_state = ours  # both start the next round from the same global model; each keeps its own state


def test_the_optimiser_keeps_its_state_between_rounds(tmp_path):
    """Round 2 from a FedAvgM that went through round 1 differs from a fresh one's: its momentum carries over."""
    settings = {"server_learning_rate": 1.0, "server_momentum": 0.9}
    start, nodes = records(grid_state(0)), [grid_state(1), grid_state(2)]
    kept = zk0_strategy(tmp_path, "fedavgm", **settings)
    after_one, _, _ = play_round(kept, 1, start, nodes, zk0_reply)
    later = [grid_state(3), grid_state(4)]
    carried, _, _ = play_round(kept, 2, after_one, later, zk0_reply)
    fresh, _, _ = play_round(zk0_strategy(tmp_path, "fedavgm", **settings), 1, after_one, later, zk0_reply)
    mean = {k: 0.25 * later[0][k] + 0.75 * later[1][k] for k in SHAPES}
    for key in SHAPES:  # lr 1 without history is the plain mean; with it, the mean plus 0.9 x round 1's step
        np.testing.assert_allclose(fresh[key].numpy(), mean[key], rtol=1e-6)
        step_one = after_one[key].numpy() - start[key].numpy()
        np.testing.assert_allclose(carried[key].numpy(), mean[key] + 0.9 * step_one, rtol=1e-5, atol=1e-6)
        assert not np.allclose(carried[key].numpy(), fresh[key].numpy())


def test_fedprox_is_the_plain_weighted_mean_as_before(tmp_path):
    assert ServerSettings.load().strategy == "fedprox" and server_optimizer(ServerSettings.load()) is None
    zk0 = Zk0FedProx(RunRecorder(tmp_path), lambda r: True, wire_format="fp16", proximal_mu=0.01,
                     weighted_by_key="num-samples", min_train_nodes=2, min_available_nodes=2)
    flower = FedProx(proximal_mu=0.01, weighted_by_key="num-samples", min_train_nodes=2, min_available_nodes=2)
    start, nodes = records(grid_state(0)), [grid_state(1), grid_state(2)]
    ours, _, config = play_round(zk0, 1, start, nodes, zk0_reply)
    theirs, _, _ = play_round(flower, 1, start, nodes, flower_reply)
    assert config["proximal-mu"] == 0.01
    for key in SHAPES:
        np.testing.assert_array_equal(ours[key].numpy(), 0.25 * nodes[0][key] + 0.75 * nodes[1][key])
        np.testing.assert_array_equal(ours[key].numpy(), theirs[key].numpy())


@pytest.mark.parametrize(("name", "flower_cls"), [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_unset_hyper_parameters_keep_flowers_defaults(name, flower_cls):
    optimizer = server_optimizer(ServerSettings.load(strategy=name, learning_rate=3e-4))
    defaults = {k: p.default for k, p in inspect.signature(flower_cls).parameters.items()}
    for arg in ("server_learning_rate", "server_momentum", "eta", "beta_1", "beta_2", "tau"):
        if arg in defaults:
            assert getattr(optimizer, arg) == defaults[arg], arg
    if flower_cls is not FedAvgM:
        assert optimizer.eta_l == 3e-4  # Flower only logs it: the nodes' learning rate


def test_bad_values_are_refused_together_naming_each_variable(monkeypatch):
    monkeypatch.setenv("ZK0_STRATEGY", "fedsgd")
    monkeypatch.setenv("ZK0_SERVER_MOMENTUM", "1.5")
    monkeypatch.setenv("ZK0_SERVER_TAU", "0")
    monkeypatch.setenv("ZK0_SERVER_LEARNING_RATE", "-1")
    with pytest.raises(SettingsError) as err:
        ServerSettings.load()
    text = str(err.value)
    assert "ZK0_STRATEGY" in text and "'fedsgd'" in text and "fedadagrad" in text
    assert "ZK0_SERVER_MOMENTUM" in text and "less than 1" in text
    assert "ZK0_SERVER_TAU" in text and "greater than 0" in text
    assert "ZK0_SERVER_LEARNING_RATE" in text


@pytest.mark.parametrize(("strategy", "stray"), [("fedadam", "server_momentum"), ("fedavgm", "server_tau"),
                                                 ("fedadagrad", "server_beta_1"), ("fedprox", "server_learning_rate")])
def test_a_setting_the_strategy_does_not_use_is_refused(strategy, stray):
    with pytest.raises(SettingsError) as err:
        ServerSettings.load(strategy=strategy, **{stray: 0.5})
    assert f"ZK0_{stray.upper()}" in str(err.value) and f"ZK0_STRATEGY={strategy}" in str(err.value)


def test_server_optimiser_settings_round_trip_through_flower_config():
    s = ServerSettings.load(strategy="fedyogi", server_learning_rate=0.02, server_beta_1=0.8, server_tau=1e-4)
    config = s.to_flower_config()
    assert config["strategy"] == "fedyogi" and "server-momentum" not in config  # unset stays unset
    assert ServerSettings.from_flower_config(config) == s
