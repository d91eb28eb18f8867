"""ZK0_TRAINABLE=lora: adapters through LeRobot's PEFT path, what travels, checkpoints plain LeRobot loads."""

import json

import pytest
import torch
from federation import run_zk0, write_env

from zk0.lora import Adapter, load_adapter
from zk0.model import (
    apply_trainable,
    frozen_fingerprint,
    load_policy,
    load_processors,
    save_checkpoint,
    trainable_state,
)
from zk0.settings import ServerSettings, SettingsError
from zk0.wire import layout_fingerprint

FFA = Adapter("lora", rank=4, alpha=8, aggregation="ffa")


@pytest.fixture(scope="module")
def base(demo):
    return str(demo["base-policy"])


def _batch(demo, policy):
    """Two preprocessed samples of node-0, through its camera map."""
    from zk0.cameras import parse_camera_map
    from zk0.data import open_dataset

    ds = open_dataset(str(demo["datasets"]["node-0"]), policy.config)
    pre, _ = load_processors(str(demo["base-policy"]), "cpu", parse_camera_map(demo["cameras"]["node-0"]))
    return pre(torch.utils.data.default_collate([ds[i] for i in range(2)]))


def _loss(policy, batch) -> float:
    policy.eval()
    with torch.no_grad():
        torch.manual_seed(3)  # the same flow-matching noise and time for every model compared
        return float(policy.forward(dict(batch))[0])


def test_only_adapters_train_and_every_process_draws_the_same_a(base):
    expert = load_policy(base, "cpu")
    fedit = load_policy(base, "cpu", Adapter("lora"), seed=5)
    names = list(trainable_state(fedit))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    def size(policy) -> int:
        return sum(v.numel() for v in trainable_state(policy).values())

    assert size(fedit) * 10 < size(expert)
    # FFA: A frozen, so it is part of the base every node must share, and the same seed gives the same A.
    a, b = load_policy(base, "cpu", FFA, seed=5), load_policy(base, "cpu", FFA, seed=5)
    assert all(".lora_B." in n for n in trainable_state(a))
    assert frozen_fingerprint(a) == frozen_fingerprint(b) != frozen_fingerprint(load_policy(base, "cpu", FFA, seed=6))
    # B starts at zero: the wrapped policy starts as the base policy.
    assert all(float(v.abs().max()) == 0 for n, v in trainable_state(a).items())


def test_layout_covers_the_adapter_settings():
    shapes = {"w.lora_B.default.weight": (4, 2)}
    tags = {Adapter("lora", alpha=8).tag(), Adapter("lora", alpha=16).tag(), Adapter("lora", aggregation="ffa").tag()}
    assert len({layout_fingerprint(shapes, t) for t in tags}) == 3
    assert Adapter().tag() == "" and layout_fingerprint(shapes, "") == layout_fingerprint(shapes)


def test_checkpoint_is_merged_lerobot_policy_with_peft_adapter_beside_it(demo, base, tmp_path):
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from peft import PeftModel

    policy = load_policy(base, "cpu", Adapter("lora", rank=4, alpha=16), seed=0)
    trained = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
               for k, v in trainable_state(policy).items()}
    apply_trainable(policy, trained)
    pre, post = load_processors(base, "cpu")
    ckpt = save_checkpoint(policy, pre, post, tmp_path / "round-001", {"round": 1})
    batch = _batch(demo, policy)
    expected = _loss(policy, batch)
    assert expected != pytest.approx(_loss(load_policy(base, "cpu"), batch), rel=1e-4)  # the adapter changes the model

    merged = SmolVLAPolicy.from_pretrained(str(ckpt), strict=True)  # plain LeRobot, every weight present
    assert not merged.config.use_peft and _loss(merged, batch) == pytest.approx(expected, rel=1e-5)
    adapter = PeftModel.from_pretrained(SmolVLAPolicy.from_pretrained(base), str(ckpt / "adapter"))
    assert json.loads((ckpt / "adapter" / "config.json").read_text())["use_peft"] is True
    assert _loss(adapter, batch) == pytest.approx(expected, rel=1e-5)

    resumed = load_policy(base, "cpu", Adapter("lora", rank=4, alpha=16), seed=0)  # a restarted server
    load_adapter(resumed, ckpt)
    assert all(torch.equal(v, trained[k]) for k, v in trainable_state(resumed).items())


def test_lora_settings_are_validated():
    with pytest.raises(SettingsError) as err:
        ServerSettings.load(trainable="everything", lora_rank=0, lora_targets="(q|v", lora_dropout=1.5)
    for name in ("ZK0_TRAINABLE", "ZK0_LORA_RANK", "ZK0_LORA_TARGETS", "ZK0_LORA_DROPOUT"):
        assert name in str(err.value)
    assert "not a regular expression" in str(err.value)


@pytest.fixture(scope="module")
def lora_run(demo, tmp_path_factory):
    """Two nodes with other camera names federating LoRA adapters, int8-delta replies."""
    tmp = tmp_path_factory.mktemp("lora")
    out = tmp / "out"
    env = write_env(
        tmp / "lora.env", demo, out, nodes=2, ZK0_MIN_NODES=2, ZK0_NUM_ROUNDS=2, ZK0_LOCAL_STEPS=10,
        ZK0_TRAINABLE="lora", ZK0_LEARNING_RATE=1e-2, ZK0_WIRE_FORMAT="int8-delta", WANDB_MODE="disabled",
    )
    return run_zk0("local", "--env-file", str(env)), out


def test_lora_federation_learns_and_moves_only_adapters(lora_run, demo):
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    res, out = lora_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    losses = [r["server_eval"]["policy_loss"] for r in history]
    assert [r["round"] for r in history] == [0, 1, 2] and max(losses[1:]) < losses[0], losses
    lora_policy = load_policy(str(demo["base-policy"]), "cpu", Adapter("lora"))
    adapters = sum(v.numel() for v in trainable_state(lora_policy).values())
    for r in history[1:]:
        assert len(r["contributors"]) == 2
        # fp16 adapters down to each node; int8 updates (plus a scale per 4096 values) and headers up.
        assert r["bytes"]["sent"] <= 2 * (2 * adapters + 4096)
        assert r["bytes"]["received"] <= 2 * (adapters + 4096 + 8)
    ckpt = out / "checkpoints" / "round-002"
    policy = SmolVLAPolicy.from_pretrained(str(ckpt), strict=True)
    assert not policy.config.use_peft and (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert "LoRA adapters" in (ckpt / "README.md").read_text()
