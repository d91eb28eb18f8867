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

from collections.abc import Iterable, Mapping, Sequence
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import GaussianPrivacyEvent, Grid, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.supercore import log
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    add_gaussian_noise_inplace,
    clip_inputs_inplace,
    compute_stdv,
    get_norm,
)

from ..privacy import noise_multiplier
from ..settings import ServerSettings
from ..wire import DELTA, PACKED, dequantize, npy_view, pack, unpack

ACCOUNTING = "Flower's RdpAccountant (dp-accounting RDP), Gaussian releases, no amplification by sampling"


class PrivateMean:
    """The round's DP mean of clipped updates and the run's privacy ledger."""

    def __init__(self, clip_norm: float, noise: float, delta: float, rounds_before: int = 0):
        self.clip_norm, self.noise_multiplier, self.delta = clip_norm, noise, delta
        self.rounds_before = rounds_before  # rounds spent before a restart, at the same noise (the experiment's)
        self.accountant: RdpAccountant | None = None  # built at the first round, when the population is known
        self.sampled = self.connected = 0
        self.norms: dict[str, float] = {}  # node -> the L2 norm its update arrived with, this round

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

    def aggregate(self, replies: Sequence[Message], base: np.ndarray, fmt: str, shapes: Mapping[str, tuple],
                  ) -> tuple[dict[str, Array], dict[str, str]]:
        """The new global model from the screened replies (Flower Arrays by name), and what the server clipped."""
        updates, self.norms, notes = [], {}, {}
        for msg in replies:
            node = str(msg.metadata.src_node_id)
            arrays = {k: npy_view(v) for k, v in msg.content["arrays"].items()}
            update, self.norms[node], why = self.update(arrays, base, fmt)
            updates.append(update)
            if why:
                notes[node] = why
                log(WARNING, "Node %s: %s", node, why)
        merged = self.release(updates, base, shapes)
        return {k: Array(np.ascontiguousarray(v)) for k, v in merged.items()}, notes

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

    def spend(self, server_round: int) -> dict:
        """Compose this round's release into the ledger and log it; what the round record keeps of it."""
        self.accountant.compose(self._event())
        alone = RdpAccountant(self.accountant.config)
        alone.compose(self._event())
        spent = self.accountant.get_privacy_spent()
        log(INFO, "Round %d privacy: epsilon %.4g spent so far at delta %g (%.4g this round; noise multiplier %.4g, "
            "clip norm %g, noise std %.3g, %d node(s) sampled)", server_round, spent.epsilon, spent.delta,
            alone.get_epsilon(self.delta), self.noise_multiplier, self.clip_norm, self.noise_std(), self.sampled)
        return {
            "epsilon": spent.epsilon, "delta": spent.delta, "round_epsilon": alone.get_epsilon(self.delta),
            "releases": spent.num_releases, "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
            "noise_std": self.noise_std(), "sampled_nodes": self.sampled, "connected_nodes": self.connected,
            "sampling_rate": self.sampled / self.connected, "accounting": ACCOUNTING,
            "update_norms": dict(self.norms),  # node: the L2 norm its update arrived with, before any server clipping
        }


class PrivateRounds:
    """Zk0FedProx's rounds (or Zk0ServerOpt's, whose step only post-processes the noised mean) under ZK0_DP=client:
    the clipping norm in the train config, the noised mean of the clipped updates in place of the weighted mean (each
    lab weighs 1 / sampled labs and is within the norm, so bounded influence has nothing left to limit) and the
    round's (epsilon, delta) in its record."""

    privacy: PrivateMean

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self.privacy.configure(config)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._base = pack(arrays.to_torch_state_dict(), "fp32")  # the updates are measured from it
        self.privacy.sample(len(messages), len(list(grid.get_node_ids())))
        return messages

    def _aggregate(self, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None, dict[str, str]]:
        replies, _ = self._check_and_log_replies(replies, is_train=True)
        if not replies:
            return None, None, {}
        merged, notes = self.privacy.aggregate(replies, self._base, self.wire_format, self._shapes)
        metrics = [RecordDict({"m": MetricRecord({**dict(m.content["metrics"]), self.weighted_by_key: 1.0})})
                   for m in replies]
        return ArrayRecord(merged), self.train_metrics_aggr_fn(metrics, self.weighted_by_key), notes

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            experiment_round = self.experiment_round(server_round)
            self.recorder.set(experiment_round, privacy=self.privacy.spend(experiment_round))
        return arrays, metrics


def private(cls: type) -> type:
    """`cls` (Zk0FedProx or Zk0ServerOpt) with PrivateRounds' hooks before its own."""
    return type(f"Private{cls.__name__}", (PrivateRounds, cls), {"__module__": __name__})
