"""Frozen-feature cache: the cached step equals SmolVLA's own, keys invalidate, off means today's path."""

import logging
import os
import shutil

import pytest
import torch
from torch.utils.data import default_collate

from zk0.cameras import CameraMap, match_cameras, parse_camera_map
from zk0.data import eval_batches, open_dataset
from zk0.evaluate import evaluate_policy
from zk0.feature_store import make_room
from zk0.features import FEATURE_PREFIX, open_features, precompute
from zk0.model import frozen_fingerprint, load_policy, load_processors
from zk0.node.session import evaluate_on_node, open_session, train_on_node
from zk0.settings import NodeSettings
from zk0.train import TrainPlan

ROWS = [3, 40, 100, 7]  # across episodes, first frames included


@pytest.fixture(scope="module")
def policy(demo):
    return load_policy(str(demo["base-policy"]), "cpu")


def _opened(demo, policy, node, tmp_path, **kwargs):
    """(dataset, preprocessor, features) of a demo node, the cache in tmp_path."""
    cameras = demo["cameras"][node]
    ds = open_dataset(str(demo["datasets"][node]), policy.config, cache_dir=tmp_path / "converted")
    pre, _ = load_processors(str(demo["base-policy"]), "cpu", parse_camera_map(cameras))
    fed, _ = match_cameras(list(ds.meta.camera_keys), list(policy.config.image_features), parse_camera_map(cameras))
    options = {"mode": "disk", "root": tmp_path / "features", "max_gb": 1.0, "fingerprint": "f0", **kwargs}
    return ds, pre, open_features(policy, ds, fed, **options)


def _step(policy, pre, raw):
    """Loss and trainable gradients of one training step with fixed flow-matching draws."""
    torch.manual_seed(0)
    policy.train()
    policy.zero_grad(set_to_none=True)
    loss, _ = policy.forward(pre(dict(raw)))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


@torch.no_grad()
def _same_slots(policy, pre, plain: dict, cached: dict) -> None:
    """The cached path's slots and masks are SmolVLA's, blank cameras' features those of its blank images.

    (Blank cameras are masked out of attention, so the loss alone would not notice wrong ones.)
    """
    images, masks = policy.prepare_images(pre(dict(plain)))
    features, feature_masks = policy.prepare_images(pre(dict(cached)))
    assert len(features) == len(images) and all(torch.equal(a, b) for a, b in zip(masks, feature_masks, strict=True))
    for image, feature in zip(images, features, strict=True):
        torch.testing.assert_close(feature, policy.model.vlm_with_expert.embed_image(image), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("node", ["node-0", "node-1", "node-2", "node-3"])  # 2 cameras, 64x48, 1 camera at 15 fps, v2.1
def test_cached_step_gives_the_plain_steps_loss_and_gradients(demo, policy, node, tmp_path):
    # node-2 has one camera for three slots: two of SmolVLA's blank cameras fill the others.
    empty, policy.config.empty_cameras = policy.config.empty_cameras, 2 if node == "node-2" else 0
    try:
        ds, pre, features = _opened(demo, policy, node, tmp_path)
        plain = default_collate([ds[i] for i in ROWS])
        loss, grads = _step(policy, pre, plain)
        for use in ("filled", "hit"):
            raw = next(features.complete([default_collate([features.view[i] for i in ROWS])]))
            assert not any(k.startswith("observation.images.") and raw[k].ndim == 4 for k in raw)  # nothing decoded
            _same_slots(policy, pre, plain, raw)
            cached_loss, cached = _step(policy, pre, raw)
            assert cached_loss == pytest.approx(loss, rel=1e-6), use
            for name, grad in grads.items():
                torch.testing.assert_close(cached[name], grad, rtol=1e-5, atol=1e-7, msg=f"{use}: {name}")
            assert features.report()["feature_frames_filled"] == (len(ROWS) if use == "filled" else 0)
    finally:
        policy.config.empty_cameras = empty


def test_a_changed_key_starts_an_empty_cache(demo, policy, tmp_path, caplog):
    data = tmp_path / "node-2"
    shutil.copytree(demo["datasets"]["node-2"], data)
    demo = {**demo, "datasets": {"node-2": data}}
    ds, _, features = _opened(demo, policy, "node-2", tmp_path)
    next(features.complete([default_collate([features.view[i] for i in ROWS])]))
    same = _opened(demo, policy, "node-2", tmp_path)[2].store
    assert same.folder == features.store.folder and same.filled.sum() == len(ROWS)
    other_weights = _opened(demo, policy, "node-2", tmp_path, fingerprint="f1")[2].store
    os.utime(data / "meta" / "info.json", ns=(1, 1))  # the dataset rewritten in place
    rewritten = _opened(demo, policy, "node-2", tmp_path)[2].store
    folders = {features.store.folder, other_weights.folder, rewritten.folder}
    assert len(folders) == 3 and other_weights.filled.sum() == rewritten.filled.sum() == 0
    # The bound: folders of other keys go, least recently used first; a dataset that cannot fit runs uncached.
    make_room(tmp_path / "features", rewritten.folder.name, needed=0, max_bytes=1)
    assert sorted(p for p in (tmp_path / "features").iterdir()) == [rewritten.folder]
    with caplog.at_level(logging.INFO, logger="zk0"):
        assert _opened(demo, policy, "node-2", tmp_path, max_gb=1e-6)[2] is None
    assert "ZK0_FEATURE_CACHE_MAX_GB" in caplog.text


def test_cache_turns_itself_off_when_the_image_path_is_not_frozen(demo, policy, tmp_path, caplog):
    vision = policy.model.vlm_with_expert.get_vlm_model().vision_model
    with caplog.at_level(logging.INFO, logger="zk0"):
        policy.config.train_expert_only = False
        try:
            assert _opened(demo, policy, "node-0", tmp_path)[2] is None
        finally:
            policy.config.train_expert_only = True
        weight = next(vision.parameters())
        weight.requires_grad_(True)  # as LoRA adapters in the vision path would
        try:
            assert _opened(demo, policy, "node-0", tmp_path)[2] is None
        finally:
            weight.requires_grad_(False)
        assert _opened(demo, policy, "node-0", tmp_path, mode="off")[2] is None
    assert "train_expert_only" in caplog.text and "vision encoder or connector train" in caplog.text
    assert "ZK0_FEATURE_CACHE=off" in caplog.text


@pytest.mark.slow  # trains a node twice (13 s on a loaded 2-core host)
def test_node_trains_and_evaluates_alike_with_the_cache_and_without(demo, tmp_path):
    plan, results = TrainPlan(steps=3, start_step=0, total_steps=3, learning_rate=1e-4, proximal_mu=0.01), {}
    for mode in ("off", "memory"):
        settings = NodeSettings.load(
            dataset=str(demo["datasets"]["node-0"]), cameras=demo["cameras"]["node-0"], heldout_episodes=1,
            cache_dir=tmp_path, feature_cache=mode,
        )
        session = open_session(settings, str(demo["base-policy"]), None, seed=0)
        evaluated = evaluate_on_node(session, batch_size=4, max_batches=2, seed=0)
        _, metrics = train_on_node(session, plan, batch_size=4, seed=1)
        results[mode] = (evaluated, metrics, session)
    (off_eval, off_train, off), (on_eval, on_train, on) = results["off"], results["memory"]
    # Off: SmolVLA's own methods, untouched; no feature figures in the metrics.
    assert "prepare_images" not in vars(off.policy) and not any(k.startswith("feature_") for k in off_train)
    assert "prepare_images" in vars(on.policy) and on_train["feature_bytes_per_frame_camera"] == 16 * 64 * 4
    for key in ("policy_loss", "action_mse"):
        assert on_eval[key] == pytest.approx(off_eval[key], rel=1e-5), key
    for key in ("loss", "policy_loss", "grad_norm"):
        assert on_train[key] == pytest.approx(off_train[key], rel=1e-5), key
    assert frozen_fingerprint(on.policy) == frozen_fingerprint(off.policy)


def test_server_evaluation_set_precomputed_evaluates_alike(demo, policy):
    ds, cameras = open_dataset(str(demo["datasets"]["server-eval"]), policy.config), demo["cameras"]["server-eval"]
    pre, post = load_processors(str(demo["base-policy"]), "cpu", parse_camera_map(cameras))
    batches = eval_batches(ds, batch_size=4, max_batches=2)
    features = precompute(policy, ds, CameraMap.parse(cameras), batches)
    assert all(any(k.startswith(FEATURE_PREFIX) for k in b) for b in features)
    plain, cached = (evaluate_policy(policy, pre, post, b, seed=0) for b in (batches, features))
    assert cached == pytest.approx(plain, rel=1e-5)
