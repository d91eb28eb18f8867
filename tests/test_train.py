"""Client training on a real tiny SmolVLA: the proximal term, the LR schedule, checkpoints."""

import math

import pytest
import torch

from zk0.cameras import parse_camera_map
from zk0.data import batch_stream, eval_batches, open_dataset
from zk0.evaluate import evaluate_policy
from zk0.model import (
    apply_trainable,
    frozen_fingerprint,
    load_policy,
    load_processors,
    save_checkpoint,
    trainable_names,
    trainable_state,
)
from zk0.train import TrainPlan, build_optimizer, proximal_term, train_round


@pytest.fixture
def policy(demo):
    return load_policy(str(demo["base-policy"]), "cpu")


def processors(demo, dataset: str, path=None):
    """The base policy's processors with the camera map of one demo dataset, as a node builds them."""
    return load_processors(str(path or demo["base-policy"]), "cpu", parse_camera_map(demo["cameras"][dataset]))


def test_only_part_of_smolvla_trains(policy):
    names = trainable_names(policy)
    total = sum(1 for _ in policy.parameters())
    assert 0 < len(names) < total
    assert all(not n.startswith("model.vlm_with_expert.vlm.") for n in names)


def test_proximal_term_value_and_gradient(policy):
    params = [p for p in policy.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    mu = 0.3
    term = proximal_term(params, anchors, mu)
    expected = 0.5 * mu * sum(float(((p.detach() - a) ** 2).sum()) for p, a in zip(params, anchors, strict=True))
    assert math.isclose(float(term), expected, rel_tol=1e-5)
    term.backward()
    for p, a in zip(params, anchors, strict=True):
        torch.testing.assert_close(p.grad, mu * (p.detach() - a), rtol=1e-5, atol=1e-8)


def test_proximal_term_is_zero_at_the_anchor(policy):
    params = [p for p in policy.parameters() if p.requires_grad]
    assert float(proximal_term(params, [p.detach().clone() for p in params], 1.0)) == 0.0


def test_lr_follows_one_schedule_across_rounds(policy):
    def plan(r: int) -> TrainPlan:
        return TrainPlan(steps=10, start_step=(r - 1) * 10, total_steps=40, learning_rate=1e-3, proximal_mu=0)

    # One optimizer for the whole run, stepped 40 times: the reference schedule.
    ref_opt, ref_sched = build_optimizer(policy, plan(1))
    reference = []
    for _ in range(40):
        reference.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref_sched.step()
    for r in (1, 2, 3, 4):
        opt, _ = build_optimizer(policy, plan(r))
        assert math.isclose(opt.param_groups[0]["lr"], reference[(r - 1) * 10], rel_tol=1e-9)
    # Warm-up happens once, at the start, not every round.
    assert reference[10] > reference[0] and reference[30] < reference[10]


def test_train_round_moves_weights_and_reports_metrics(demo, policy):
    pre, _ = processors(demo, "node-0")
    ds = open_dataset(str(demo["datasets"]["node-0"]), policy.config)
    before = trainable_state(policy)
    plan = TrainPlan(steps=4, start_step=0, total_steps=8, learning_rate=1e-3, proximal_mu=0.1, log_every=2)
    metrics = train_round(policy, pre, batch_stream(ds, 4, seed=0), plan)
    for key in ("loss", "policy_loss", "proximal_loss", "grad_norm", "lr", "steps", "samples", "train_seconds"):
        assert key in metrics and math.isfinite(metrics[key])
    assert metrics["steps"] == 4 and metrics["samples"] == 16
    assert metrics["proximal_loss"] > 0
    assert math.isclose(metrics["loss"], metrics["policy_loss"] + metrics["proximal_loss"], rel_tol=1e-4)
    after = trainable_state(policy)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_non_finite_loss_fails_the_round_naming_its_step(demo, policy):
    pre, _ = processors(demo, "node-0")
    good = next(batch_stream(open_dataset(str(demo["datasets"]["node-0"]), policy.config), 2, seed=0))
    bad = {**good, "action": torch.full_like(good["action"], float("nan"))}
    plan = TrainPlan(steps=3, start_step=0, total_steps=3, learning_rate=1e-3, proximal_mu=0.0, log_every=5)
    # Metrics are read once per log line: the check comes at the round's end here, and still names step 2.
    with pytest.raises(FloatingPointError, match="loss became nan at local step 2"):
        train_round(policy, pre, iter([good, bad, good]), plan)


def test_mismatched_weights_are_refused(policy):
    state = trainable_state(policy)
    name = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        apply_trainable(policy, {**state, name: torch.zeros(3, 3, 3)})
    state.pop(name)
    with pytest.raises(ValueError, match="missing"):
        apply_trainable(policy, state)


def test_checkpoint_loads_with_identical_actions(demo, policy, tmp_path):
    pre, post = processors(demo, "node-1")
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.05)
    path = save_checkpoint(policy, pre, post, tmp_path / "round-001", {"round": 1})
    loaded = load_policy(str(path), "cpu")
    pre2, post2 = processors(demo, "node-1", path)
    assert frozen_fingerprint(loaded) == frozen_fingerprint(policy)
    ds = open_dataset(str(demo["datasets"]["node-1"]), policy.config)
    batches = eval_batches(ds, 4, 2)
    original = evaluate_policy(policy, pre, post, batches, seed=7)
    reloaded = evaluate_policy(loaded, pre2, post2, batches, seed=7)
    assert original == reloaded
    assert not (tmp_path / ".round-001.tmp").exists()


def test_evaluation_is_deterministic(demo, policy):
    pre, post = processors(demo, "server-eval")
    ds = open_dataset(str(demo["datasets"]["server-eval"]), policy.config)
    batches = eval_batches(ds, 4, 2)
    first = evaluate_policy(policy, pre, post, batches, seed=1)
    assert first == evaluate_policy(policy, pre, post, batches, seed=1)
    assert first["action_mse"] > 0 and first["num-samples"] == 8
