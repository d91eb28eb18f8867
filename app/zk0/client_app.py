"""Flower ClientApp: unpack the message, call zk0's node code, pack the reply."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .logs import setup_logging
from .node import evaluate_on_node, open_session, train_on_node
from .settings import NodeSettings
from .train import TrainPlan
from .wire import encode, npy_view, views

app = ClientApp()


def received_weights(msg: Message) -> dict:
    """The message's weights as read-only views of its bytes: open_session copies them into the policy once."""
    return views({k: npy_view(v) for k, v in msg.content["arrays"].items()}, str(msg.content["config"]["wire-format"]))


def reply_weights(state: dict, fmt: str) -> ArrayRecord:
    """Trained weights in the wire format, packed as the reply's ArrayRecord."""
    return ArrayRecord({k: Array(v) for k, v in encode(state, fmt).items()})


def _session(msg: Message, context: Context):
    setup_logging()
    settings = NodeSettings.from_flower_config(dict(context.node_config))
    config = msg.content["config"]
    state = received_weights(msg)
    session = open_session(
        settings, str(config["base-policy"]), state, int(config["seed"]), str(config["base-fingerprint"])
    )
    return settings, config, session


def _reply(msg: Message, settings: NodeSettings, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord({k: float(v) for k, v in metrics.items()})})
    if arrays is not None:
        content["arrays"] = arrays
    content["node"] = ConfigRecord({"name": settings.display_name, "dataset": settings.dataset})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global weights on this node's data."""
    settings, config, session = _session(msg, context)
    server_round, steps = int(config["server-round"]), int(config["local-steps"])
    plan = TrainPlan(
        steps=steps,
        start_step=(server_round - 1) * steps,
        total_steps=int(config["total-steps"]),
        learning_rate=float(config["learning-rate"]),
        proximal_mu=float(config["proximal-mu"]),
        log_every=settings.log_every,
    )
    seed = int(config["seed"]) + 1000 * server_round
    state, metrics = train_on_node(session, plan, int(config["batch-size"]), seed)
    return _reply(msg, settings, metrics, reply_weights(state, str(config["wire-format"])))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global weights on this node's held-out episodes."""
    settings, config, session = _session(msg, context)
    metrics = evaluate_on_node(session, int(config["batch-size"]), int(config["eval-batches"]), int(config["seed"]))
    return _reply(msg, settings, metrics)
