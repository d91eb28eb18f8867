"""Flower ClientApp: unpack the message, have zk0's node code run it, pack the reply.

The work runs in the node's warm worker (zk0.node.warm) unless the node sets `warm = false`; then it runs
here, in Flower's per-message process. Either way it is the same NodeWorker.handle. This module
imports neither torch nor LeRobot, so the per-message process stays light when a worker does the work.

Under Flower's simulation runtime (`zk0 local --simulation N`) the virtual SuperNodes carry only
Flower's partition-id/num-partitions: virtual node k takes the env-file's node k mod D (the run
config's `sim-nodes`), with its own batches, and works in the process Flower runs it in (a Ray
actor); virtual nodes on the same dataset share that process's session of it. A warm worker per
virtual node would be N extra processes, each holding torch and a policy: 64 do not fit a workstation.
"""

from __future__ import annotations

import json
from dataclasses import replace

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..logs import setup_logging
from ..node_faults import STARTED
from ..settings import NodeSettings
from ..stats import DIGEST_KEY, STATS_KEY, digest
from . import secagg
from .messages import NodeReply, NodeRequest

app = ClientApp()
# Simulation: NodeWorkers kept per process (a Ray actor serves many virtual nodes), one per env-file
# node: virtual nodes on the same dataset share its session (policy, processors, datasets).
_sim_workers: dict[int, object] = {}


def node_settings(context: Context) -> tuple[NodeSettings, str, tuple[int, int] | None]:
    """This node's settings, its name in records, and under Flower's simulation runtime its virtual node
    index and the env-file node it takes (else None)."""
    templates = str(context.run_config.get("sim-nodes") or "")
    if not templates or "dataset" in context.node_config:
        settings = NodeSettings.from_flower_config(dict(context.node_config))
        return settings, settings.display_name, None
    nodes = json.loads(templates)
    index = int(context.node_config["partition-id"])
    settings = NodeSettings.from_flower_config({**nodes[index % len(nodes)], "warm": False})
    return settings, f"sim-{index:03d}", (index, index % len(nodes))


def _sim_run(index: int, template: int, request: NodeRequest) -> NodeReply:
    """Virtual node `index`'s request, in this process: its env-file node's session, its own batches."""
    from .worker import NodeWorker

    worker = _sim_workers.setdefault(template, NodeWorker())
    # Virtual nodes on one dataset split it the same way; each draws its own batches from the training episodes.
    return worker.handle(replace(request, batch_seed_offset=index))


def to_request(kind: str, msg: Message, node_config: dict) -> NodeRequest:
    """The message as a request: configs, and the weights as their .npy bytes (not parsed here)."""
    arrays = msg.content["arrays"] if "arrays" in msg.content else ArrayRecord()
    if any(a.stype != "numpy.ndarray" for a in arrays.values()):
        raise TypeError("received weights must be numpy arrays (stype 'numpy.ndarray')")
    config = dict(msg.content["config"])
    if STATS_KEY in msg.content:  # the run's statistics, sent beside the config (zk0.stats.STATS_KEY)
        config[STATS_KEY] = str(msg.content[STATS_KEY]["json"])
    if DIGEST_KEY in config and config[DIGEST_KEY] != digest(str(config.get(STATS_KEY) or "")):
        raise ValueError("the normalisation statistics received do not match the digest in the message's config")
    return NodeRequest(kind, node_config, config, {k: a.data for k, a in arrays.items()})


def to_reply(result: NodeReply, name: str, dataset: str, msg: Message) -> Message:
    """The node's reply as Flower records: metrics, the weights of a train reply, what the records show per node."""
    content = RecordDict({"metrics": MetricRecord({k: float(v) for k, v in result.metrics.items()})})
    if result.arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in result.arrays.items()})
    if result.eval_metrics is not None:
        # The received model's held-out metrics: a ConfigRecord, as Flower aggregates a train reply's one MetricRecord.
        content["eval"] = ConfigRecord({k: float(v) for k, v in result.eval_metrics.items()})
    node = {"name": name, "dataset": dataset, "layout": result.layout, **result.info}
    if result.stats is not None:
        node["stats"] = result.stats
    content["node"] = ConfigRecord(node)
    return Message(content=content, reply_to=msg)


def _work(kind: str, msg: Message, context: Context) -> tuple[NodeReply, NodeSettings, str]:
    """Have the node's worker (warm, in this process, or simulated) handle the message."""
    log = setup_logging()
    settings, name, virtual = node_settings(context)
    # Flower has started this ClientApp: `zk0 local`'s watch (zk0.deploy.node_watch) stops timing its start-up here.
    log.info("%s: %s %s message", name, STARTED, msg.metadata.message_type)
    if virtual is not None:
        result = _sim_run(*virtual, to_request(kind, msg, settings.to_flower_config()))
    elif settings.warm:
        from .warm import call

        result = call(to_request(kind, msg, dict(context.node_config)))
    else:
        from .worker import NodeWorker

        result = NodeWorker().handle(to_request(kind, msg, dict(context.node_config)))
    return result, settings, name


def _run(kind: str, msg: Message, context: Context) -> Message:
    result, settings, name = _work(kind, msg, context)
    return to_reply(result, name, settings.dataset, msg)


@app.train(mods=[secagg.secagg_when_asked])
def train(msg: Message, context: Context) -> Message:
    """Train the received global weights on this node's data; in a SecAgg+ round, reply with the masked update."""
    if not secagg.is_secagg_train(msg):
        return _run("train", msg, context)
    received = secagg.as_zk0(msg)
    result, settings, name = _work("train", msg, context)
    return secagg.fit_reply(result, received, name, settings.dataset, settings.secagg_keep_dir, msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global weights on this node's held-out episodes."""
    return _run("evaluate", msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Normalisation statistics of this node's training episodes (before round 1): summaries, never frames."""
    return _run("stats", msg, context)
