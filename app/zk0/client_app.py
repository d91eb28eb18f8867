"""Flower ClientApp: unpack the message, have zk0's node code run it, pack the reply.

The work runs in the node's warm worker (zk0.warm) unless the node sets `warm = false`; then it runs
here, in Flower's per-message process. Either way it is the same NodeWorker.handle. This module
imports neither torch nor LeRobot, so the per-message process stays light when a worker does the work.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .logs import setup_logging
from .node_watch import STARTED
from .settings import NodeSettings

app = ClientApp()


def _request(op: str, msg: Message, context: Context) -> dict:
    """The message as a plain request: configs, and the weights as their .npy bytes (not parsed here)."""
    arrays = msg.content["arrays"] if "arrays" in msg.content else ArrayRecord()
    if any(a.stype != "numpy.ndarray" for a in arrays.values()):
        raise TypeError("received weights must be numpy arrays (stype 'numpy.ndarray')")
    return {
        "op": op,
        "node_config": dict(context.node_config),
        "config": dict(msg.content["config"]),
        "arrays": {k: a.data for k, a in arrays.items()},
    }


def _run(op: str, msg: Message, context: Context) -> Message:
    log = setup_logging()
    settings = NodeSettings.from_flower_config(dict(context.node_config))
    # Flower has started this ClientApp: `zk0 local`'s watch (zk0.node_watch) stops timing its start-up here.
    log.info("%s: %s %s message", settings.display_name, STARTED, msg.metadata.message_type)
    request = _request(op, msg, context)
    if settings.warm:
        from .warm import call

        result = call(request)
    else:
        from .node import NodeWorker

        result = NodeWorker().handle(request)
    content = RecordDict({"metrics": MetricRecord({k: float(v) for k, v in result["metrics"].items()})})
    if result["arrays"] is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in result["arrays"].items()})
    node = {"name": settings.display_name, "dataset": settings.dataset, "layout": result["layout"], **result.get("info", {})}
    if "stats" in result:
        node["stats"] = result["stats"]
    content["node"] = ConfigRecord(node)
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global weights on this node's data."""
    return _run("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global weights on this node's held-out episodes."""
    return _run("evaluate", msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Normalisation statistics of this node's training episodes (before round 1): summaries, never frames."""
    return _run("stats", msg, context)
