"""ZK0_DP: the settings it refuses, the accountant's numbers against dp-accounting called directly, the node's clipping
and the server's noised mean (zk0.privacy, zk0.server.privacy, zk0.node.worker)."""

from __future__ import annotations

import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from flwr.app import ConfigRecord
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from zk0.node.worker import CLIPPING_NORM, clipped_reply
from zk0.privacy import noise_multiplier
from zk0.server.privacy import PrivateMean
from zk0.settings import ServerSettings, SettingsError
from zk0.wire import DELTA, PACKED

DP = {"dp": "client", "dp_clip_norm": 1.0, "wire_format": "fp32", "stats": "base"}


def direct_epsilon(noise: float, rounds: int, delta: float = 1e-5) -> float:
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(noise), rounds)
    return accountant.get_epsilon(delta)


def refusal(**settings) -> str:
    with pytest.raises(SettingsError) as err:
        ServerSettings.load(**settings)
    return str(err.value)


def test_every_dp_problem_is_named_in_one_refusal():
    text = refusal(dp="client", dp_clip_norm=0, dp_delta=2, aggregation="median", wire_format="fp16")
    for needle in ("ZK0_DP_CLIP_NORM=0", "set exactly one", "ZK0_DP_DELTA=2", "ZK0_AGGREGATION=median",
                   "ZK0_WIRE_FORMAT=fp16", "ZK0_STATS=federated"):
        assert needle in text, (needle, text)
    assert "noise multiplier 1000 spends" in refusal(**DP, dp_target_epsilon=0.001, num_rounds=3)
    assert "set exactly one" in refusal(**DP, dp_target_epsilon=4, dp_noise_multiplier=1)
    assert "without noise" in refusal(**DP, dp_noise_multiplier=-1)
    assert "not used with ZK0_DP=off" in refusal(dp_clip_norm=1.0)


def test_sound_dp_settings_load_with_a_server_optimiser_and_int8_delta():
    s = ServerSettings.load(**{**DP, "wire_format": "int8-delta"}, dp_noise_multiplier=1.1, strategy="fedadam")
    assert noise_multiplier(s) == 1.1


@pytest.mark.parametrize("target", [1.0, 4.0, 10.0])
def test_target_epsilon_gives_the_least_noise_that_keeps_it(target):
    s = ServerSettings.load(**DP, dp_target_epsilon=target, num_rounds=3)
    noise = noise_multiplier(s)
    assert direct_epsilon(noise, 3) <= target < direct_epsilon(noise / 1.002, 3)


def test_the_ledger_matches_dp_accounting_round_by_round():
    mean = PrivateMean(clip_norm=0.5, noise=1.3, delta=1e-5)
    spent = []
    for _ in range(3):
        config = ConfigRecord()
        mean.configure(config)
        mean.sample(2, 4)
        spent.append(mean.spend(1))
    assert config[KEY_CLIPPING_NORM] == 0.5
    assert [p["epsilon"] for p in spent] == pytest.approx([direct_epsilon(1.3, r) for r in (1, 2, 3)], rel=1e-9)
    assert all(p["round_epsilon"] == pytest.approx(direct_epsilon(1.3, 1), rel=1e-9) for p in spent)
    assert spent[-1]["sampling_rate"] == 0.5 and spent[-1]["noise_std"] == pytest.approx(1.3 * 0.5 / 2)
    resumed = PrivateMean(clip_norm=0.5, noise=1.3, delta=1e-5, rounds_before=2)
    resumed.configure(ConfigRecord())
    resumed.sample(2, 4)
    assert resumed.spend(3)["epsilon"] == pytest.approx(spent[-1]["epsilon"], rel=1e-9)


@pytest.mark.parametrize("fmt", ["fp32", DELTA])
def test_the_node_clips_what_the_server_reads(fmt):
    assert CLIPPING_NORM == KEY_CLIPPING_NORM
    rng = np.random.default_rng(0)
    received = rng.normal(0, 0.02, 10_000).astype(np.float32)
    trained = received + rng.normal(0, 0.01, received.size).astype(np.float32)
    arrays, norm = clipped_reply(trained, received, fmt, clip_norm=0.05)
    assert norm == pytest.approx(np.linalg.norm(trained - received), rel=1e-5) and norm > 0.5
    server = PrivateMean(clip_norm=0.05, noise=1.0, delta=1e-5)
    _, arrived, why = server.update(arrays, received, fmt)
    assert 0.05 * 0.999 <= arrived <= 0.05 and not why


def test_the_server_clips_an_unclipped_update_and_noises_the_fixed_denominator_mean():
    base = np.zeros(200_000, np.float32)
    mean = PrivateMean(clip_norm=1.0, noise=0.5, delta=1e-5)
    mean.configure(ConfigRecord())
    mean.sample(3, 3)  # three sampled, two replied: the third counts as a zero update
    far = np.full(base.size, 0.01, np.float32)  # norm 4.47
    update, norm, why = mean.update({PACKED: far}, base, "fp32")
    assert norm == pytest.approx(np.sqrt(base.size) * 0.01, rel=1e-5) and "clipped by the server" in why
    assert np.linalg.norm(update.astype(np.float64)) == pytest.approx(1.0, rel=1e-4)
    released = mean.release([update, update], base, {"a": (100_000,), "b": (2, 50_000)})
    noise = np.concatenate([released["a"], released["b"].reshape(-1)]) - 2 * update / 3
    assert noise.std() == pytest.approx(0.5 * 1.0 / 3, rel=0.02) and abs(noise.mean()) < 1e-3


def test_wandb_gets_the_rounds_epsilon():
    from zk0.server.tracking import round_metrics

    logged = round_metrics({"privacy": {"epsilon": 2.5, "round_epsilon": 1.5, "noise_std": 0.1, "delta": 1e-5}})
    assert logged == {"privacy/epsilon": 2.5, "privacy/round_epsilon": 1.5, "privacy/noise_std": 0.1}
