"""Policy loading: the fast path (no random initialisation) loads exactly what LeRobot loads."""

import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

from zk0.model import load_policy, trainable_params, trainable_state


def test_load_policy_equals_lerobots_own_loading(demo, caplog):
    path = str(demo["base-policy"])
    with caplog.at_level("INFO", logger="zk0"):
        fast = load_policy(path, "cpu")
    assert "does not hold every weight" not in caplog.text  # the fast path was taken
    config = PreTrainedConfig.from_pretrained(path)
    config.device = "cpu"
    plain = SmolVLAPolicy.from_pretrained(path, config=config)
    pairs = ((fast.state_dict(), plain.state_dict()), (dict(fast.named_buffers()), dict(plain.named_buffers())))
    for mine, theirs in pairs:
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in plain.named_parameters()]


def test_load_policy_falls_back_when_the_file_lacks_weights(demo, tmp_path, caplog):
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path / "partial"
    shutil.copytree(demo["base-policy"], path)
    weights = load_file(path / "model.safetensors")
    dropped = next(k for k in weights if "action_out_proj" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, path / "model.safetensors")
    with caplog.at_level("INFO", logger="zk0"):
        policy = load_policy(str(path), "cpu")
    assert "does not hold every weight" in caplog.text
    assert torch.isfinite(policy.state_dict()[dropped]).all()  # initialised, as LeRobot leaves it


def test_trainable_params_are_the_live_parameters(demo):
    policy = load_policy(str(demo["base-policy"]), "cpu")
    live, copy = trainable_params(policy), trainable_state(policy)
    name = next(iter(live))
    with torch.no_grad():
        dict(policy.named_parameters())[name].add_(1.0)
    assert torch.equal(live[name], copy[name] + 1.0)
