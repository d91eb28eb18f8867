"""Adaptive FedProx mu: the heuristic of Li et al. 2020 ("Federated Optimization in Heterogeneous Networks", Sec. 5.3).

The paper raises mu by a fixed step whenever the loss increases and lowers it by that step after the loss has
decreased for some consecutive rounds (5 there). Here the loss is the nodes' mean training policy loss of each
round (the proximal term left out, so mu does not feed its own signal), bounds and step are settings, and mu is
recomputed from the whole round history each time: a resumed server, whose records hold the same history, arrives
at the same mu without any state of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

LOSS_KEY = "policy_loss"  # in each round's train_aggregate: the sample-weighted mean over the nodes that trained


def next_mu(losses: Iterable[float], start: float, step: float, patience: int, upper: float) -> float:
    """mu for the round after `losses` (one per finished round, oldest first), starting from `start`."""
    mu, previous, falling = start, None, 0
    for loss in losses:
        if previous is not None:
            if loss > previous:
                mu, falling = min(upper, mu + step), 0
            else:
                falling += 1
                if falling >= patience:
                    mu, falling = max(0.0, mu - step), 0
        previous = loss
    return mu


def round_losses(history: Iterable[dict]) -> list[float]:
    """The mean training loss of every round record that has one, in round order."""
    records = sorted((r for r in history if r.get("round", 0) > 0), key=lambda r: r["round"])
    losses = [(r.get("train_aggregate") or {}).get(LOSS_KEY) for r in records]
    return [float(loss) for loss in losses if loss is not None]


def mu_schedule(settings) -> Callable[[Iterable[dict]], float] | None:
    """ZK0_ADAPTIVE_MU's rule as a function of the round records so far, or None when mu is fixed."""
    if settings.adaptive_mu == "off":
        return None

    def schedule(history: Iterable[dict]) -> float:
        return next_mu(
            round_losses(history), settings.proximal_mu, settings.adaptive_mu_step, settings.adaptive_mu_patience,
            settings.adaptive_mu_max,
        )

    return schedule
