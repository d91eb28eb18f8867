"""Personalised models: made in the last round's evaluate message only, kept on the node in LeRobot's format,
scored on the same held-out batches as the global model, and the node's session goes on with the global weights."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math

import pytest
from flwr.app import Array
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.factory import make_pre_post_processors
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

from zk0.lora import Adapter
from zk0.model import frozen_fingerprint, load_policy, trainable_shapes, trainable_state
from zk0.node.messages import NodeRequest
from zk0.node.personal import checkpoint_steps, validation_split
from zk0.node.worker import NodeWorker
from zk0.server.adaptive import next_mu, round_losses
from zk0.settings import NodeSettings, ServerSettings, SettingsError
from zk0.wire import PACKED, layout_fingerprint, pack


def evaluate_request(demo, tmp_path, adapter: Adapter | None = None, **changes) -> NodeRequest:
    """An evaluate message as the ClientApp hands it over, for the last of 3 rounds, personalisation on."""
    base, adapter = str(demo["base-policy"]), adapter or Adapter()
    policy = load_policy(base, "cpu", adapter)
    config = {
        "wire-format": "fp32", "base-policy": base, "seed": 0, "base-fingerprint": frozen_fingerprint(policy),
        "weights-layout": layout_fingerprint(trainable_shapes(policy), adapter.tag()), **adapter.to_config(),
        "server-round": 3, "local-steps": 2, "total-steps": 6, "learning-rate": 1e-3, "batch-size": 4,
        "eval-batches": 1, "personalize-steps": 3, "personalize-mu": 0.01, **changes,
    }
    node = {"dataset": str(demo["datasets"]["node-0"]), "cameras": demo["cameras"]["node-0"], "torch-threads": 1,
            "personal-dir": str(tmp_path / "personal")}
    arrays = {PACKED: Array(pack(trainable_state(policy), "fp32")).data}  # exactly the base weights
    return NodeRequest("evaluate", NodeSettings.from_flower_config(node), config, arrays)


def with_config(request: NodeRequest, **changes) -> NodeRequest:
    """The same request with some of its Flower config changed."""
    return dataclasses.replace(request, config={**request.config, **changes})


def saved(tmp_path) -> tuple[dict, dict]:
    """The kept model's zk0.json and trainable weights, loaded with plain LeRobot (processors included) from inside
    its folder: the demo's VLM travels in it as vlm/, named relatively (zk0.portable)."""
    path = tmp_path / "personal" / "round-003"
    with contextlib.chdir(path):
        loaded = SmolVLAPolicy.from_pretrained(".")
        make_pre_post_processors(PreTrainedConfig.from_pretrained("."), pretrained_path=".")
    return json.loads((path / "zk0.json").read_text()), trainable_state(loaded)


def differs(a: dict, b: dict) -> bool:
    return any(not (a[k] == v).all() for k, v in b.items())


def test_validation_split_comes_from_the_training_episodes_only():
    fit, val = validation_split([0, 2, 3, 5, 6, 7], seed=4)
    assert len(val) == 2 and sorted(fit + val) == [0, 2, 3, 5, 6, 7] and not set(fit) & set(val)
    assert validation_split([0, 2, 3, 5, 6, 7], seed=4) == (fit, val)  # drawn from the seed
    assert validation_split([1, 4], seed=0) == ([1, 4], [])  # one left to fine-tune on: no split
    assert checkpoint_steps(30) == [10, 20, 30] and checkpoint_steps(2) == [1, 2]


def test_last_round_keeps_the_model_that_validates_best_and_the_session_goes_on_with_the_global_one(demo, tmp_path):
    worker, request = NodeWorker(), evaluate_request(demo, tmp_path)
    earlier = worker.handle(with_config(request, **{"server-round": 2})).metrics
    assert not any(k.startswith("personal_") for k in earlier)  # not the last round: nothing personal
    assert not (tmp_path / "personal").exists()

    metrics = worker.handle(request).metrics
    assert metrics["policy_loss"] == earlier["policy_loss"]  # the global model, scored as before
    assert metrics["personal_trained_steps"] == 3 and metrics["personal_val_episodes"] == 1
    assert metrics["personal_num-samples"] == metrics["num-samples"]
    assert math.isfinite(metrics["personal_tuned_policy_loss"])
    # The warm session holds the global weights again: a later message scores exactly what it did before.
    again = worker.handle(with_config(request, **{"personalize-steps": 0})).metrics
    assert again["policy_loss"] == earlier["policy_loss"]

    info, personal = saved(tmp_path)
    assert info["heldout"]["personal"]["policy_loss"] == metrics["personal_policy_loss"]
    assert info["personalize_steps"] == 3 and info["chosen_steps"] == metrics["personal_steps"]
    assert not set(info["validation_episodes"]) & set(info["heldout_episodes"] + info["fine_tune_episodes"])
    chosen = info["heldout"]["validation_policy_loss"]
    assert sorted(chosen, key=int) == ["0", "1", "2", "3"] and min(chosen.values()) == chosen[str(info["chosen_steps"])]
    global_state = trainable_state(load_policy(str(demo["base-policy"]), "cpu"))
    assert differs(personal, global_state) == bool(metrics["personal_kept"])


def test_selection_keeps_the_global_model_when_fine_tuning_hurts_on_validation(demo, tmp_path):
    # A learning rate far too high: every checkpoint validates worse than the global model.
    metrics = NodeWorker().handle(evaluate_request(demo, tmp_path, **{"learning-rate": 5.0})).metrics
    assert metrics["personal_val_policy_loss"] == metrics["personal_global_val_policy_loss"]
    assert metrics["personal_kept"] == 0 and metrics["personal_steps"] == 0
    assert metrics["personal_policy_loss"] == metrics["policy_loss"]  # the global model's held-out figures
    assert metrics["personal_tuned_policy_loss"] > metrics["policy_loss"]  # what always fine-tuning would have kept
    info, kept = saved(tmp_path)  # the folder still holds the node's best model: the global one
    assert info["kept"] == "global"
    assert not differs(kept, trainable_state(load_policy(str(demo["base-policy"]), "cpu")))


def test_selection_keeps_the_personal_model_when_fine_tuning_helps_on_validation(demo, tmp_path):
    # A global model that fits no node (its action head 20x too large): fine-tuning shrinks it, and the node's
    # validation episodes see the gain. (The tiny demo's base model itself only overfits in a few steps.)
    base = trainable_state(load_policy(str(demo["base-policy"]), "cpu"))
    unfit = {k: v * 20 if "action_out_proj" in k else v for k, v in base.items()}
    request = evaluate_request(demo, tmp_path, **{"personalize-steps": 6})
    request.arrays[PACKED] = Array(pack(unfit, "fp32")).data
    metrics = NodeWorker().handle(request).metrics
    assert metrics["personal_kept"] == 1 and metrics["personal_steps"] in (2, 4, 6)
    assert metrics["personal_val_policy_loss"] < metrics["personal_global_val_policy_loss"]
    info, kept = saved(tmp_path)
    assert info["kept"] == "personal" and info["chosen_steps"] == metrics["personal_steps"]
    assert differs(kept, unfit) and info["heldout"]["personal"]["policy_loss"] == metrics["personal_policy_loss"]


def test_too_few_training_episodes_to_validate_on_keep_the_global_model(demo, tmp_path, caplog):
    request = evaluate_request(demo, tmp_path)  # 6 episodes, 4 held out: 2 to train on, none to spare
    request = dataclasses.replace(request, settings=request.settings.model_copy(update={"heldout_episodes": 4}))
    with caplog.at_level("WARNING", logger="zk0"):
        metrics = NodeWorker().handle(request).metrics
    assert "too few to validate" in caplog.text
    assert metrics["personal_kept"] == 0 and metrics["personal_val_episodes"] == 0
    assert metrics["personal_policy_loss"] == metrics["policy_loss"] and "personal_tuned_policy_loss" not in metrics
    info, kept = saved(tmp_path)
    assert info["kept"] == "global" and info["validation_episodes"] == []
    assert not differs(kept, trainable_state(load_policy(str(demo["base-policy"]), "cpu")))


def test_lora_personal_model_is_saved_merged_as_a_plain_policy(demo, tmp_path):
    request = evaluate_request(demo, tmp_path, Adapter(trainable="lora"), **{"learning-rate": 1e-2})
    metrics = NodeWorker().handle(request).metrics
    path = tmp_path / "personal" / "round-003"
    assert math.isfinite(metrics["personal_policy_loss"]) and math.isfinite(metrics["personal_tuned_policy_loss"])
    assert not PreTrainedConfig.from_pretrained(str(path)).use_peft and (path / "adapter").is_dir()
    with contextlib.chdir(path):
        SmolVLAPolicy.from_pretrained(".")


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
