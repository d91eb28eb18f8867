"""Flower's server optimisers (ZK0_STRATEGY: FedAvgM, FedAdam, FedYogi, FedAdagrad) stepping on zk0's mean."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi
from flwr.supercore import log

from ..settings import ServerSettings
from .records import RunRecorder
from .strategy import Zk0FedProx

Aggregated = tuple[ArrayRecord | None, MetricRecord | None]  # a round's new global model and its metrics


class _Averaged(FedAvg):
    """FedAvg's place under one of Flower's server optimisers, filled by zk0's mean.

    FedAvgM's and FedOpt's (FedAdam, FedYogi, FedAdagrad) `aggregate_train` ask FedAvg for the mean of the
    replies, then step from the global model their `configure_train` noted. Here the mean is the one zk0
    computed (screened, sample-weighted, fp32) and nothing is sent: the step itself runs as Flower ships it.
    """

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
    ) -> Iterable[Message]:
        return []  # zk0's strategy sends the messages; the optimiser above only notes the round's global model

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Aggregated:
        return self._mean

    def summary(self) -> None:
        """Nothing: sampling and keys are zk0's strategy's, which logs them."""

    def step(self, server_round: int, arrays: ArrayRecord, metrics: MetricRecord | None) -> Aggregated:
        """The optimiser's `aggregate_train` on an already averaged round: the new global model."""
        self._mean = (arrays, metrics)
        try:
            return self.aggregate_train(server_round, [])
        finally:
            del self._mean


# ZK0_STRATEGY's server optimisers: Flower's classes with zk0's mean where FedAvg's aggregation was.
SERVER_OPTIMIZERS = {
    name: type(cls.__name__, (cls, _Averaged), {"__module__": __name__})
    for name, cls in {"fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}.items()
}


def server_optimizer(settings: ServerSettings) -> _Averaged | None:
    """The Flower optimiser ZK0_STRATEGY names, given only the settings that are set (the rest keep Flower's
    defaults); None for fedprox, whose server step is the mean itself."""
    if settings.strategy == "fedprox":
        return None
    fedavgm = settings.strategy == "fedavgm"
    names = {"server_learning_rate": "server_learning_rate" if fedavgm else "eta", "server_momentum": "server_momentum",
             "server_beta_1": "beta_1", "server_beta_2": "beta_2", "server_tau": "tau"}
    kwargs = {flwr: getattr(settings, ours) for ours, flwr in names.items() if getattr(settings, ours) is not None}
    if not fedavgm:
        kwargs["eta_l"] = settings.learning_rate  # FedOpt only logs its client-side rate: the nodes' peak LR
    return SERVER_OPTIMIZERS[settings.strategy](**kwargs)


class Zk0ServerOpt(Zk0FedProx):
    """Zk0FedProx whose mean update goes through a Flower server optimiser (FedAvgM, FedAdam, FedYogi, FedAdagrad).

    Screening, records, wire formats and the streaming mean are Zk0FedProx's; the nodes still get `proximal-mu`
    (FedProx's term is their loss, independent of the server step). The optimiser's state (momentum, moments)
    lives in this process only: a restarted ServerApp resumes from the checkpoint with fresh state, and counts
    the optimiser's rounds (FedAdam's bias correction) from 1 again, as Flower's loop does.
    """

    def __init__(self, optimizer: _Averaged, recorder: RunRecorder, is_eval_round: Callable[[int], bool], **kwargs):
        super().__init__(recorder, is_eval_round, **kwargs)
        self.optimizer = optimizer

    def summary(self) -> None:
        """Flower's optimiser and its settings, then FedProx's."""
        log(INFO, "\t├──> Server optimiser: Flower's %s", type(self.optimizer).__name__)
        self.optimizer.summary()
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
    ) -> Iterable[Message]:
        # The fp32 global model the round starts from; the optimiser counts this run's rounds, as Flower's loop does.
        self.optimizer.configure_train(server_round, arrays, config, grid)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Aggregated:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        arrays, metrics = self.optimizer.step(server_round, arrays, metrics)
        # FedAdam's bias-corrected rate is a NumPy float64, which makes its result float64: the global model stays fp32.
        fp32 = {k: v if v.dtype == "float32" else Array(v.numpy().astype(np.float32)) for k, v in arrays.items()}
        return ArrayRecord(fp32), metrics
