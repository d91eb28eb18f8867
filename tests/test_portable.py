"""Checkpoints travel: copied to another folder with the demo's VLM gone, plain LeRobot still loads them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.factory import make_pre_post_processors
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

from zk0.model import load_policy, load_processors, save_checkpoint
from zk0.portable import describe


@pytest.fixture
def private_base(demo, tmp_path):
    """The demo's base policy and VLM copied to a folder this test may delete (the demo is shared)."""
    src = tmp_path / "machine-a"
    shutil.copytree(demo["vlm"], src / "vlm")
    shutil.copytree(demo["base-policy"], src / "base-policy")
    config = src / "base-policy" / "config.json"
    config.write_text(config.read_text().replace(str(Path(demo["vlm"]).resolve()), str(src / "vlm")))
    pre = src / "base-policy" / "policy_preprocessor.json"
    pre.write_text(pre.read_text().replace(str(Path(demo["vlm"]).resolve()), str(src / "vlm")))
    assert json.loads(config.read_text())["vlm_model_name"] == str(src / "vlm")
    return src


def _observation(config) -> dict:
    gen = torch.Generator().manual_seed(0)
    batch = {key: torch.rand(1, *ft.shape, generator=gen) for key, ft in config.input_features.items()}
    return {**batch, "task": ["pick up the cube\n"]}


def _act(policy, pre, post) -> torch.Tensor:
    policy.eval()
    torch.manual_seed(0)  # the flow-matching noise
    return post(policy.select_action(pre(_observation(policy.config))))


def _plain_lerobot(ckpt: Path):
    """How docs/getting-started.md ("Use a checkpoint elsewhere") tells a user to load a checkpoint copied to another
    machine, with LeRobot alone."""
    cfg = PreTrainedConfig.from_pretrained(ckpt)
    if not Path(cfg.vlm_model_name).is_dir() and (ckpt / "vlm").is_dir():  # the demo's VLM travels inside
        cfg.vlm_model_name = str(ckpt / "vlm")
    policy = SmolVLAPolicy.from_pretrained(ckpt, config=cfg)
    tokenizer = {"tokenizer_processor": {"tokenizer_name": cfg.vlm_model_name}}
    pre, post = make_pre_post_processors(cfg, pretrained_path=str(ckpt), preprocessor_overrides=tokenizer)
    return policy, pre, post


def test_a_copied_checkpoint_loads_elsewhere_without_the_demo(private_base, tmp_path, monkeypatch):
    base = str(private_base / "base-policy")
    policy = load_policy(base, "cpu")
    pre, post = load_processors(base, "cpu")
    expected = _act(policy, pre, post)
    save_checkpoint(policy, pre, post, private_base / "ckpt", {"round": 1, "base_policy": describe(base, private_base)})

    moved = tmp_path / "machine-b" / "round-001"
    shutil.copytree(private_base / "ckpt", moved)
    shutil.rmtree(private_base)  # the VLM, the base policy and the original checkpoint are gone
    assert json.loads((moved / "zk0.json").read_text())["base_policy"] == "base-policy"
    with pytest.raises(OSError):  # LeRobot alone, names as saved: the old machine's VLM folder is gone
        SmolVLAPolicy.from_pretrained(moved)

    elsewhere = tmp_path / "another-cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    policy, pre, post = _plain_lerobot(moved)
    assert torch.allclose(_act(policy, pre, post), expected, atol=1e-5)
    # zk0's own loaders (a checkpoint as the next experiment's base policy) resolve it too.
    assert torch.equal(load_policy(str(moved), "cpu").state_dict()["model.action_out_proj.weight"],
                       policy.state_dict()["model.action_out_proj.weight"])
    load_processors(str(moved), "cpu")


def test_on_the_machine_that_wrote_it_plain_from_pretrained_needs_nothing_else(private_base, tmp_path, monkeypatch):
    base = str(private_base / "base-policy")
    ckpt = save_checkpoint(load_policy(base, "cpu"), *load_processors(base, "cpu"), private_base / "ckpt", {"round": 1})
    assert not any((ckpt / "vlm").glob("*.safetensors")) and (ckpt / "vlm" / "config.json").is_file()
    monkeypatch.chdir(tmp_path)  # any working directory
    policy = SmolVLAPolicy.from_pretrained(ckpt)
    make_pre_post_processors(policy.config, pretrained_path=str(ckpt))


def test_hub_ids_are_kept_and_local_paths_are_named_relative_to_the_experiment(tmp_path):
    assert describe("lerobot/smolvla_base", tmp_path) == "lerobot/smolvla_base"
    (tmp_path / "demo-data" / "base-policy").mkdir(parents=True)
    assert describe(str(tmp_path / "demo-data" / "base-policy"), tmp_path / "outputs") == "../demo-data/base-policy"
    assert describe(None, tmp_path) is None
