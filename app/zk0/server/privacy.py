"""ZK0_DP=client on the server: Flower's clipping and Gaussian-noise helpers on zk0's packed replies, and Flower's RDP
accountant's (epsilon, delta) round by round.

Flower's own pair (`DifferentialPrivacyClientSideFixedClipping` with `fixedclipping_mod`) cannot carry zk0's replies:
the mod needs one ConfigRecord (zk0's train message has two: the config and the statistics beside it) and reply keys
equal to the sent ones (an int8-delta reply has two arrays for one), and it subtracts the wire arrays as they are (a
bf16 reply is int16 bits); the wrapper accounts only for FedAvg's own aggregate_train and drops a round with any error
reply. So the same steps run here, with Flower's helpers, on the replies unpacked to fp32: the node clips (zk0.node.
worker.clipped_reply), the server checks what arrives, takes the mean with the sampled count as its fixed
denominator (a sampled lab that sent nothing counts as a zero update) and adds noise of std z x C / sampled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    add_gaussian_noise_inplace,
    clip_inputs_inplace,
    compute_stdv,
    get_norm,
)

from ..privacy import noise_multiplier
from ..settings import ServerSettings
from ..wire import DELTA, PACKED, dequantize, unpack

ACCOUNTING = "Flower's RdpAccountant (dp-accounting RDP), Gaussian releases, no amplification by sampling"


class PrivateMean:
    """The round's DP mean of clipped updates and the run's privacy ledger."""

    def __init__(self, clip_norm: float, noise: float, delta: float, rounds_before: int = 0):
        self.clip_norm, self.noise_multiplier, self.delta = clip_norm, noise, delta
        self.rounds_before = rounds_before  # rounds spent before a restart, at the same noise (the experiment's)
        self.accountant: RdpAccountant | None = None  # built at the first round, when the population is known
        self.sampled = self.connected = 0

    @classmethod
    def maybe(cls, settings: ServerSettings, rounds_before: int = 0) -> PrivateMean | None:
        """The ZK0_DP settings' mechanism, or None when DP is off."""
        if settings.dp == "off":
            return None
        return cls(settings.dp_clip_norm, noise_multiplier(settings), settings.dp_delta, rounds_before)

    def configure(self, config: ConfigRecord) -> None:
        """Tell the nodes the clipping norm, under Flower's config key."""
        config[KEY_CLIPPING_NORM] = self.clip_norm

    def sample(self, sampled: int, connected: int) -> None:
        """Note the round's sample: its size is the mean's fixed denominator."""
        self.sampled, self.connected = sampled, max(connected, sampled)
        if self.accountant is None and sampled:
            self.accountant = RdpAccountant(PrivacyConfig(self.delta, self.connected,
                                                          NeighboringRelation.ADD_OR_REMOVE_ONE,
                                                          SamplingMethod.NO_AMPLIFICATION))
            for _ in range(self.rounds_before):
                self.accountant.compose(self._event())

    def _event(self) -> GaussianPrivacyEvent:
        population = self.accountant.config.population_size
        return GaussianPrivacyEvent(self.noise_multiplier, min(self.sampled, population), population)

    def update(self, arrays: Mapping[str, np.ndarray], base: np.ndarray, fmt: str) -> tuple[np.ndarray, float, str]:
        """A screened reply's update (flat fp32), its L2 norm as it arrived, and why the server clipped it ("" when
        the node had, as it must)."""
        update = dequantize(arrays, base.size) if fmt == DELTA else np.asarray(arrays[PACKED], np.float32) - base
        norm = get_norm([update])
        if norm <= self.clip_norm:
            return update, norm, ""
        clip_inputs_inplace([update], self.clip_norm)
        return update, norm, f"update arrived with L2 norm {norm:.4g} > ZK0_DP_CLIP_NORM = {self.clip_norm:g}: " \
                             "clipped by the server (the node did not clip)"

    def release(self, updates: Sequence[np.ndarray], base: np.ndarray, shapes: Mapping[str, tuple]) -> dict:
        """The new global model, tensor by tensor: base + the updates' sum over the sampled count + Gaussian noise."""
        mean = np.zeros_like(base)
        for update in updates:
            mean += update
        mean /= np.float32(self.sampled)
        tensors = unpack(mean, shapes)  # views of mean: the noise goes into it one tensor at a time
        add_gaussian_noise_inplace(list(tensors.values()), self.noise_std())
        mean += base
        return tensors

    def noise_std(self) -> float:
        """The noise's standard deviation on the mean (Flower's compute_stdv)."""
        return compute_stdv(self.noise_multiplier, self.clip_norm, self.sampled)

    def spend(self, norms: Mapping[str, float]) -> dict:
        """Compose this round's release into the ledger; what the round record keeps of it."""
        self.accountant.compose(self._event())
        alone = RdpAccountant(self.accountant.config)
        alone.compose(self._event())
        spent = self.accountant.get_privacy_spent()
        return {
            "epsilon": spent.epsilon, "delta": spent.delta, "round_epsilon": alone.get_epsilon(self.delta),
            "releases": spent.num_releases, "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
            "noise_std": self.noise_std(), "sampled_nodes": self.sampled, "connected_nodes": self.connected,
            "sampling_rate": self.sampled / self.connected, "accounting": ACCOUNTING,
            "update_norms": dict(norms),  # node: the L2 norm its update arrived with, before any server clipping
        }
