"""ZK0_TEST_ATTACK, the testing hook that makes one named node hostile: what each attack sends, how a bad value is
refused, and (slow) a hostile node in a real `zk0 local` federation neutralised by the default defences."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from federation import run_zk0, write_env

from zk0.attacks import ENV, Attack, hostile, parse_attack, parse_attacks
from zk0.settings_names import check_env_names
from zk0.train import TrainPlan

TRAINED, RECEIVED = np.array([1.5, -2.0, 3.0], np.float32), np.array([1.0, -1.0, 2.0], np.float32)
UPDATE = TRAINED - RECEIVED


@pytest.mark.parametrize(("kind", "sent"), [
    ("scale", RECEIVED + 100 * UPDATE),
    ("flip", RECEIVED - 10 * UPDATE),
    ("replay", RECEIVED),
    ("claim", TRAINED),
    ("diverge", TRAINED),
])
def test_each_attack_sends_what_it_names(kind, sent):
    attack = parse_attack(f"{kind}@node-1")
    np.testing.assert_allclose(attack.weights(TRAINED, RECEIVED, seed=0), sent, rtol=1e-6)


def test_noise_has_the_honest_updates_norm_times_the_factor_and_its_seed():
    attack = parse_attack("noise:3@node-1")
    sent = attack.weights(TRAINED, RECEIVED, seed=5)
    assert np.linalg.norm(sent - RECEIVED) == pytest.approx(3 * np.linalg.norm(UPDATE), rel=1e-5)
    np.testing.assert_array_equal(sent, attack.weights(TRAINED, RECEIVED, seed=5))
    assert not np.allclose(sent, attack.weights(TRAINED, RECEIVED, seed=6))


def test_claim_inflates_the_samples_and_diverge_the_learning_rate_only():
    metrics = {"num-samples": 240.0, "loss": 1.0}
    assert parse_attack("claim@n").metrics(metrics) == {"num-samples": 1e6, "loss": 1.0}
    assert parse_attack("scale@n").metrics(metrics) == metrics
    plan = TrainPlan(steps=5, start_step=0, total_steps=15, learning_rate=1e-3, proximal_mu=0.01)
    assert parse_attack("diverge@n").plan(plan).learning_rate == pytest.approx(1.0)
    assert parse_attack("flip@n").plan(plan) == plan


def test_only_the_named_node_attacks():
    environ = {ENV: "scale@node-1,claim:50@node-1,flip@node-2"}
    assert hostile("node-1", environ) == [Attack("scale", 100.0, "node-1"), Attack("claim", 50.0, "node-1")]
    assert hostile("node-0", environ) == []
    assert hostile("node-1", {}) == []


def test_a_bad_value_is_refused_with_every_problem_named():
    with pytest.raises(ValueError) as err:
        parse_attacks("scal@node-1,flip:x,noise:-1@node-2")
    text = str(err.value)
    assert "unknown attack 'scal'" in text and "no node named" in text and "'x' is not a number" in text
    assert "'-1' must be positive" in text and ENV in text


def test_the_variable_is_a_known_name():
    check_env_names({ENV})  # not refused as a typo


def test_zk0_check_refuses_an_attack_on_a_node_that_is_not_there(demo, tmp_path):
    env = write_env(tmp_path / "x.env", demo, tmp_path / "out", **{ENV: "scale@node-9"})
    res = run_zk0("check", "--env-file", str(env), timeout=300)
    assert res.returncode != 0 and "node-9" in res.stderr and ENV in res.stderr, res.stderr[-2000:]


# The real federation: 4 SuperNodes on loopback, 2 rounds; node-1 sends its update x100 and claims 1e6 samples.
HOSTILE = "scale@node-1,claim@node-1"
SMALL = {"ZK0_NUM_ROUNDS": 2, "ZK0_LOCAL_STEPS": 3, "ZK0_EVAL_BATCHES": 1, "ZK0_CHECKPOINT_EVERY": 1,
         "ZK0_STATS": "base", "WANDB_MODE": "disabled", ENV: HOSTILE}


def _federation(demo, tmp_path_factory, name: str, **extra) -> Path:
    tmp = tmp_path_factory.mktemp(name)
    out = tmp / "out"
    res = run_zk0("local", "--env-file", str(write_env(tmp / "x.env", demo, out, **{**SMALL, **extra})))
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return out


@pytest.fixture(scope="module")
def defended(demo, tmp_path_factory) -> Path:
    """The default defences (claims capped, share cap, norm bound)."""
    return _federation(demo, tmp_path_factory, "defended")


@pytest.fixture(scope="module")
def undefended(demo, tmp_path_factory) -> Path:
    """No share cap and no norm bound (the claim cap has no off switch: the claim alone cannot be shown here)."""
    return _federation(demo, tmp_path_factory, "undefended", ZK0_MAX_NODE_SHARE=1, ZK0_NORM_BOUND_FACTOR=0)


def _global_change(out: Path, base: Path, server_round: int) -> float:
    """L2 distance between the global models of round r-1 and r (the base policy for round 0), over every weight."""
    from safetensors.torch import load_file

    def weights(path: Path) -> dict:
        return load_file(str(path / "model.safetensors"))

    before = weights(base if server_round == 1 else out / "checkpoints" / f"round-{server_round - 1:03d}")
    after = weights(out / "checkpoints" / f"round-{server_round:03d}")
    assert before.keys() == after.keys()
    return float(sum(((after[k].float() - before[k].float()) ** 2).sum() for k in after) ** 0.5)


def _rounds(out: Path) -> list[dict]:
    return [json.loads((out / f"round-{r:03d}.json").read_text()) for r in (1, 2)]


def _hostile_id(record: dict) -> str:
    return next(node for node, c in record["clients"].items() if c["name"] == "node-1")


def test_the_hostile_node_says_loudly_that_it_attacks(defended):
    logs = "".join(p.read_text(errors="replace") for p in (defended / "local" / "logs").glob("*.log"))
    assert "node-1: ZK0_TEST_ATTACK" in logs and "THIS NODE IS ATTACKING" in logs
    assert "node-0: ZK0_TEST_ATTACK" not in logs


def test_the_default_defences_neutralise_a_scaled_update_and_an_inflated_claim(defended, demo):
    for record in _rounds(defended):
        node = _hostile_id(record)
        assert record["clients"][node]["train"]["num-samples"] == 1e6  # what it claimed
        why = record["clipped"][node]
        assert "claimed 1e+06 samples" in why and "weighted as 24" in why  # 3 steps x batch 8
        assert set(record["clipped"]) == {node}  # the honest nodes are untouched
        # Its update was scaled back to the bound, and the global model moved no further than the bound allows.
        factor, median = map(float, re.search(r"median = ([\d.]+) x ([\d.e+-]+)", why).groups())
        assert "update L2 norm" in why and factor == 3
        change = _global_change(defended, Path(demo["base-policy"]), record["round"])
        assert 0 < change <= factor * median * 1.001


def test_without_the_defences_the_attack_moves_the_model(defended, undefended, demo):
    base = Path(demo["base-policy"])
    for r in (1, 2):
        assert _global_change(undefended, base, r) > 5 * _global_change(defended, base, r)
    assert all(not rec["clipped"] or set(rec["clipped"]) == {_hostile_id(rec)} for rec in _rounds(undefended))
    loss = {name: json.loads((out / "round-002.json").read_text())["server_eval"]["policy_loss"]
            for name, out in (("defended", defended), ("undefended", undefended))}
    assert loss["undefended"] > loss["defended"], loss
