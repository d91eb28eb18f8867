"""Personalised models: made in the last round's evaluate message only, kept on the node in LeRobot's format,
scored on the same held-out batches as the global model, and the node's session goes on with the global weights."""

from __future__ import annotations

import json
import math

import pytest
from flwr.app import Array
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.factory import make_pre_post_processors
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

from zk0.lora import Adapter
from zk0.model import frozen_fingerprint, load_policy, trainable_shapes, trainable_state
from zk0.node.session import NodeWorker
from zk0.server.adaptive import next_mu, round_losses
from zk0.settings import ServerSettings, SettingsError
from zk0.wire import PACKED, layout_fingerprint, pack


def evaluate_request(demo, tmp_path, adapter: Adapter = Adapter(), **changes) -> dict:
    """An evaluate message as the ClientApp hands it over, for the last of 3 rounds, personalisation on."""
    base = str(demo["base-policy"])
    policy = load_policy(base, "cpu", adapter)
    config = {
        "wire-format": "fp16", "base-policy": base, "seed": 0, "base-fingerprint": frozen_fingerprint(policy),
        "weights-layout": layout_fingerprint(trainable_shapes(policy), adapter.tag()), **adapter.to_config(),
        "server-round": 3, "local-steps": 2, "total-steps": 6, "learning-rate": 1e-3, "batch-size": 4,
        "eval-batches": 1, "personalize-steps": 2, "personalize-mu": 0.01, **changes,
    }
    node = {"dataset": str(demo["datasets"]["node-0"]), "cameras": demo["cameras"]["node-0"], "torch-threads": 1,
            "personal-dir": str(tmp_path / "personal")}
    arrays = {PACKED: Array(pack(trainable_state(policy), "fp16")).data}
    return {"op": "evaluate", "node_config": node, "config": config, "arrays": arrays}


def test_last_round_keeps_a_personal_model_and_the_session_goes_on_with_the_global_one(demo, tmp_path):
    worker, request = NodeWorker(), evaluate_request(demo, tmp_path)
    earlier = worker.handle({**request, "config": {**request["config"], "server-round": 2}})["metrics"]
    assert not any(k.startswith("personal_") for k in earlier)  # not the last round: nothing personal
    assert not (tmp_path / "personal").exists()

    metrics = worker.handle(request)["metrics"]
    assert metrics["policy_loss"] == earlier["policy_loss"]  # the global model, scored as before
    assert metrics["personal_steps"] == 2 and metrics["personal_num-samples"] == metrics["num-samples"]
    assert math.isfinite(metrics["personal_policy_loss"]) and metrics["personal_policy_loss"] != metrics["policy_loss"]
    # The warm session holds the global weights again: a later message scores exactly what it did before.
    again = worker.handle({**request, "config": {**request["config"], "personalize-steps": 0}})["metrics"]
    assert again["policy_loss"] == earlier["policy_loss"]

    # Plain LeRobot loads it, processors included, and it holds the personal weights, not the global ones.
    path = tmp_path / "personal" / "round-003"
    info = json.loads((path / "zk0.json").read_text())
    assert info["heldout"]["personal"]["policy_loss"] == metrics["personal_policy_loss"]
    assert info["personalize_steps"] == 2
    loaded = SmolVLAPolicy.from_pretrained(str(path))
    make_pre_post_processors(PreTrainedConfig.from_pretrained(str(path)), pretrained_path=str(path))
    global_state, personal = trainable_state(load_policy(str(demo["base-policy"]), "cpu")), trainable_state(loaded)
    assert any(not (personal[k] == v).all() for k, v in global_state.items())


def test_lora_personal_model_is_saved_merged_as_a_plain_policy(demo, tmp_path):
    request = evaluate_request(demo, tmp_path, Adapter(trainable="lora"), **{"learning-rate": 1e-2})
    metrics = NodeWorker().handle(request)["metrics"]
    path = tmp_path / "personal" / "round-003"
    assert math.isfinite(metrics["personal_policy_loss"])
    assert not PreTrainedConfig.from_pretrained(str(path)).use_peft and (path / "adapter").is_dir()
    SmolVLAPolicy.from_pretrained(str(path))


def test_adaptive_mu_follows_fedprox_rule():
    # Up one step when the loss rises; down one step after `patience` falls in a row; within [0, upper].
    assert next_mu([2.0, 2.5, 2.4, 2.3], start=0.01, step=0.01, patience=2, upper=1.0) == pytest.approx(0.01)
    assert next_mu([2.0, 2.5, 2.6], start=0.01, step=0.01, patience=1, upper=0.025) == pytest.approx(0.025)
    assert next_mu([2.0, 1.9, 1.8], start=0.01, step=0.01, patience=1, upper=1.0) == 0.0
    history = [{"round": 0}, {"round": 2, "train_aggregate": {"policy_loss": 1.5}},
               {"round": 1, "train_aggregate": {"policy_loss": 2}}]
    assert round_losses(history) == [2.0, 1.5]


def test_adaptive_mu_bounds_are_validated():
    with pytest.raises(SettingsError, match="ZK0_ADAPTIVE_MU_MAX"):
        ServerSettings.load(adaptive_mu="loss", proximal_mu=0.5, adaptive_mu_max=0.1)
    with pytest.raises(SettingsError, match="ZK0_ADAPTIVE_MU_STEP"):
        ServerSettings.load(adaptive_mu="loss", adaptive_mu_step=0)
    with pytest.raises(SettingsError, match="ZK0_PERSONALIZE_STEPS"):
        ServerSettings.load(personalize_steps=-1)


def test_strategy_sends_and_records_each_rounds_adaptive_mu(tmp_path, monkeypatch):
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity
    from test_server_opt import _Fleet, grid_state, records, zk0_strategy

    from zk0.server.adaptive import mu_schedule

    for name in ("_run_id", "_node_id", "_task_id"):  # inside a ServerApp Flower sets the run messages belong to
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)
    strategy = zk0_strategy(tmp_path, "fedadam")  # any strategy: mu is the nodes' term
    strategy.mu_schedule = mu_schedule(ServerSettings.load(adaptive_mu="loss", proximal_mu=0.01, adaptive_mu_step=0.01))
    for server_round, loss in ((1, 2.0), (2, 2.5)):  # the loss rose: mu goes up one step for round 3
        strategy.recorder.set(server_round, train_aggregate={"policy_loss": loss})
    messages = list(strategy.configure_train(3, records(grid_state(0)), ConfigRecord({}), _Fleet(2)))
    assert [m.content["config"]["proximal-mu"] for m in messages] == [pytest.approx(0.02)] * 2
    assert strategy.recorder.rounds[3]["proximal_mu"] == pytest.approx(0.02)
