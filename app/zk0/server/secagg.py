"""ZK0_SECURE_AGGREGATION=secaggplus: each round's training runs as Flower's own SecAgg+ protocol.

Flower 1.42's `SecAggPlusWorkflow` is written for the legacy workflow ServerApp: its `__call__` requires a
`LegacyContext` and its stages call a legacy `Strategy`'s `configure_fit`/`aggregate_fit`. zk0 keeps its Message-API
strategy loop (`Strategy.start`) and runs the workflow inside it, through hooks only: `configure_train` builds the
round's messages as always but hands Flower's loop none to send; `aggregate_train` then runs the four SecAgg+ stages
(setup, share keys, collect masked vectors, unmask) with a `LegacyContext` whose strategy is a shim that hands the
workflow those messages as `FitIns` and takes back what its unmask stage reconstructs: the sample-weighted mean of
the nodes' updates. Nodes reply with their update (trained - received, fp32) masked by `secaggplus_mod`
(zk0.node.secagg); the server sums masked vectors and never holds one node's update.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.server import LegacyContext
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from flwr.supercore import log

from ..errors import RunFailed
from ..settings import ServerSettings
from ..stats import STATS_KEY
from ..wire import npy_bytes_view, pack, unpack
from .grid import PromptGrid
from .strategy import Zk0FedProx

NODE_PREFIX, EVAL_PREFIX = "node.", "eval."  # how a node's records travel in its FitRes metrics (flat scalars)
MASKED = SecAggKey.MASKED_PARAMETERS
DROPPED = "dropped out of the SecAgg+ round before its masked update arrived"
HALTED = "the SecAgg+ round halted: too few nodes left for the reconstruction threshold"


class _Proxy(ClientProxy):
    """The one thing the workflow reads from a legacy client proxy is its node id."""

    def __init__(self, node_id: int):
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, ins, timeout, group_id):  # noqa: D102 - never called by SecAggPlusWorkflow
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


class _Shim(Strategy):
    """The legacy strategy the workflow drives: zk0's round messages in, the reconstructed mean out."""

    def __init__(self, messages: list[Message]):
        self.messages, self.mean, self.results, self.failures = messages, None, [], []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Proxy(m.metadata.dst_node_id), _fit_ins(m)) for m in self.messages]

    def aggregate_fit(self, server_round, results, failures):
        # Every FitRes carries the same parameters: the unmasked mean (Flower's backward-compatible hand-over).
        self.mean = parameters_to_ndarrays(results[0][1].parameters) if results else None
        self.results, self.failures = results, failures
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Watch(PromptGrid):
    """The grid the workflow runs on, counting what the nodes' masked-vector replies carry: SecAgg+'s masked
    vectors, and any arrays beside them (none: secaggplus_mod clears the handler's)."""

    def __init__(self, grid: Grid):
        super().__init__(grid)
        self.masked_bytes = self.plain_bytes = self.masked_values = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for reply in replies:
            secagg = reply.content.config_records.get(RECORD_KEY_CONFIGS) if not reply.has_error() else None
            if secagg is not None and MASKED in secagg:
                self.masked_bytes += sum(len(b) for b in secagg[MASKED])
                self.masked_values += sum(npy_bytes_view(b).size for b in secagg[MASKED])
                self.plain_bytes += sum(len(a.data) for r in reply.content.array_records.values() for a in r.values())
        return replies


def _fit_ins(msg: Message) -> FitIns:
    """A zk0 train message as legacy FitIns: its packed weights, its config and the run's statistics."""
    config = dict(msg.content["config"])
    if STATS_KEY in msg.content:
        config[STATS_KEY] = str(msg.content[STATS_KEY]["json"])
    arrays = msg.content["arrays"]
    return FitIns(Parameters([a.data for a in arrays.values()], "numpy.ndarray"), config)


def node_records(fitres: FitRes) -> tuple[dict, dict, dict]:
    """A node's metrics, node info and in-train evaluation from its FitRes metrics (zk0.node.secagg packs them)."""
    metrics, node, evaluation = {}, {}, {}
    for key, value in fitres.metrics.items():
        if key.startswith(NODE_PREFIX):
            node[key[len(NODE_PREFIX):]] = value
        elif key.startswith(EVAL_PREFIX):
            evaluation[key[len(EVAL_PREFIX):]] = value
        else:
            metrics[key] = value
    return metrics, node, evaluation


def secaggplus_workflow(settings: ServerSettings) -> SecAggPlusWorkflow:
    """Flower's workflow with the ZK0_SECAGG_* settings; the largest weight is what an honest node can claim."""
    return SecAggPlusWorkflow(
        num_shares=settings.secagg_num_shares, reconstruction_threshold=settings.secagg_threshold,
        max_weight=float(settings.local_steps * settings.batch_size), clipping_range=settings.secagg_clipping_range,
        timeout=settings.round_timeout,
    )


class Zk0SecAggPlus(Zk0FedProx):
    """Zk0FedProx whose training rounds run Flower's SecAggPlusWorkflow: only the masked sum reaches the server."""

    def __init__(self, workflow: SecAggPlusWorkflow, **kwargs):
        super().__init__(**kwargs)
        self.workflow = workflow
        self._round: tuple[list[Message], Grid] | None = None  # the round's messages and grid, for aggregate_train
        self._secagg_mean: np.ndarray | None = None  # the round's unmasked mean update (flat fp32)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
    ) -> Iterable[Message]:
        self._base = pack(arrays.to_torch_state_dict(), "fp32")  # the mean update is added to it
        self._round = (list(super().configure_train(server_round, arrays, config, grid)), grid)
        return []  # nothing for Flower's loop to send: aggregate_train runs the round as SecAgg+

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        messages, grid = self._round
        shim = _Shim(messages)
        context = LegacyContext(Context(0, 0, {}, RecordDict(), {}), strategy=shim)
        context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
        context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
        watch = _Watch(grid)
        self.workflow(watch, context)
        if shim.mean is None:  # nothing to aggregate: zk0's strategy fails the round naming every node
            log(WARNING, "SecAgg+ halted in round %d: %d failure(s)", server_round, len(shim.failures))
            return super().aggregate_train(server_round, [Message(Error(0, HALTED), reply_to=m) for m in messages])
        by_node = {str(m.metadata.dst_node_id): m for m in messages}
        replied = [_as_reply(fitres, by_node.pop(proxy.cid)) for proxy, fitres in shim.results]
        # A node that sent no masked vector dropped out; its masks were removed with its neighbours' key shares.
        replied += [Message(Error(0, DROPPED), reply_to=m) for m in by_node.values()]
        # A masked update is in the sum once it arrived: an unsound reply cannot be left out, so the round fails.
        if unsound := {m.metadata.src_node_id: r for m in replied if not m.has_error() and (r := self._sound(m))}:
            raise RunFailed(f"round {self.experiment_round(server_round)}: SecAgg+ summed unsound replies: {unsound}")
        self._secagg_mean = np.asarray(shim.mean[0], dtype=np.float32)
        log(INFO, "SecAgg+ round %d: the masked sum of %d node(s) unmasked", server_round, len(shim.results))
        # What reached the server from the nodes: masked vectors only (the round record shows it).
        self.recorder.set(self.experiment_round(server_round), secagg={
            "masked_vectors": len(shim.results), "dropped": len(by_node), "masked_bytes": watch.masked_bytes,
            "masked_values": watch.masked_values, "plain_array_bytes": watch.plain_bytes})
        self.recorder.add_bytes(self.experiment_round(server_round), "received", watch.masked_bytes)
        return super().aggregate_train(server_round, replied)

    def _screen(self, msg: Message) -> str | None:
        return None  # aggregate_train checked what is visible (_sound) before the sum was used

    def _sound(self, msg: Message) -> str | None:
        """Why a node's visible reply is unsound: nothing of its update can be screened, only its layout and claim."""
        node = msg.content.get("node")
        if not node or node.get("layout") != self._layout:
            return "weights have the wrong names or shapes"
        claim = msg.content["metrics"].get(self.weighted_by_key)
        if not isinstance(claim, int | float) or not claim > 0:
            return f"{self.weighted_by_key} {claim!r} is not a positive number"
        return None

    def _aggregate(self, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None, dict[str, str]]:
        if not replies:
            return None, None, {}
        flat = self._base + self._secagg_mean.reshape(-1)[: self._base.size]
        merged = {k: Array(np.ascontiguousarray(v)) for k, v in unpack(flat, self._shapes).items()}
        metrics = self.train_metrics_aggr_fn([RecordDict({"m": m.content["metrics"]}) for m in replies],
                                             self.weighted_by_key)
        return ArrayRecord(merged), metrics, {}


def _as_reply(fitres: FitRes, sent: Message) -> Message:
    """A node's SecAgg+ reply as zk0's strategy reads one: its metrics and records, and no weights."""
    metrics, node, evaluation = node_records(fitres)
    content = RecordDict({"metrics": MetricRecord(metrics), "node": ConfigRecord(node)})
    if evaluation:
        content["eval"] = ConfigRecord(evaluation)
    return Message(content=content, reply_to=sent)
