"""FedProx with zk0's hooks: per-node records, update screening, evaluation cadence."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from logging import WARNING

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedProx
from flwr.supercore import log

from .records import RunRecorder
from .wire import aggregate, encode, is_finite


def _payload_bytes(arrays: ArrayRecord) -> int:
    return sum(len(array.data) for array in arrays.values())


class _LazyArrays(Mapping):
    """A reply's arrays as numpy, deserialised one at a time so aggregation never holds all of them."""

    def __init__(self, record: ArrayRecord):
        self.record = record

    def __getitem__(self, key):
        return self.record[key].numpy()

    def __iter__(self) -> Iterator[str]:
        return iter(self.record)

    def __len__(self) -> int:
        return len(self.record)


def _node_info(msg: Message) -> dict:
    node = msg.content.get("node")
    return {"name": str(node["name"]), "dataset": str(node["dataset"])} if node else {}


class Zk0FedProx(FedProx):
    """FedProx that records every node's reply and drops updates that would poison the average."""

    def __init__(self, recorder: RunRecorder, is_eval_round: Callable[[int], bool], wire_format: str = "fp32", **kwargs):
        super().__init__(**kwargs)
        self.wire_format = wire_format
        self.recorder = recorder
        self.is_eval_round = is_eval_round
        self._shapes: dict[str, tuple] = {}
        # Rounds already done before a restart: Flower's loop counts from 1 again, the records do not.
        self.round_offset = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self._shapes = {k: tuple(v.shape) for k, v in arrays.items()}
        arrays = self._to_wire(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.recorder.add_bytes(server_round, "sent", _payload_bytes(arrays) * len(messages))
        return messages

    def _screen(self, msg: Message) -> str | None:
        """Why a training reply must not be aggregated, or None when it is sound."""
        arrays = msg.content.get("arrays")
        if arrays is None:
            return "reply has no weights"
        shapes = {k: tuple(v.shape) for k, v in arrays.items()}
        if shapes != self._shapes:
            return "weights have the wrong names or shapes"
        if not all(is_finite(v.numpy(), self.wire_format) for v in arrays.values()):
            return "weights contain NaN or Inf"
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        accepted, rejected = [], {}
        for msg in replies:
            node_id = msg.metadata.src_node_id
            if msg.has_error():
                rejected[str(node_id)] = f"error: {msg.error.reason}"
                continue
            reason = self._screen(msg)
            info = {**_node_info(msg), **dict(msg.content["metrics"])}
            self.recorder.client(server_round, node_id, "train", info)
            self.recorder.add_bytes(server_round, "received", _payload_bytes(msg.content["arrays"]) if "arrays" in msg.content else 0)
            if reason:
                log(WARNING, "Excluding node %s from aggregation: %s", node_id, reason)
                rejected[str(node_id)] = reason
            else:
                accepted.append(msg)
        arrays, metrics = self._aggregate(accepted)
        self.recorder.set(
            server_round,
            contributors=sorted(m.metadata.src_node_id for m in accepted),
            excluded=rejected,
            train_aggregate=dict(metrics) if metrics else None,
        )
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        if not self.is_eval_round(server_round):
            return []
        return super().configure_evaluate(server_round, self._to_wire(arrays), config, grid)

    def _to_wire(self, arrays: ArrayRecord) -> ArrayRecord:
        """The fp32 global model in the wire format nodes receive."""
        wire = encode(arrays.to_torch_state_dict(), self.wire_format)
        return ArrayRecord({k: Array(v) for k, v in wire.items()})

    def _aggregate(self, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sample-weighted mean in fp32, streamed tensor by tensor from the 16-bit replies."""
        replies, _ = self._check_and_log_replies(replies, is_train=True)
        if not replies:
            return None, None
        updates = [
            (_LazyArrays(m.content["arrays"]), float(m.content["metrics"][self.weighted_by_key])) for m in replies
        ]
        merged = aggregate(updates, self.wire_format)
        metrics = self.train_metrics_aggr_fn([m.content for m in replies], self.weighted_by_key)
        return ArrayRecord({k: Array(v) for k, v in merged.items()}), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        usable = []
        for msg in replies:
            if msg.has_error():
                continue
            metrics = dict(msg.content["metrics"])
            self.recorder.client(server_round, msg.metadata.src_node_id, "eval", {**_node_info(msg), **metrics})
            if metrics.get(self.weighted_by_key, 0) > 0:
                usable.append(msg)
        metrics = super().aggregate_evaluate(server_round, usable)
        self.recorder.set(server_round, eval_aggregate=dict(metrics) if metrics else None)
        return metrics
