"""The node's side of ZK0_SECURE_AGGREGATION=secaggplus: Flower's `secaggplus_mod` masks what a node sends.

Flower's SecAgg+ workflow (zk0.server.secagg) speaks the legacy shapes: its train message carries `fitins.*`
records and `secaggplus_mod` reads the handler's reply as a `FitRes` (`fitres.*`), quantises its float arrays and
weight (num_examples) and sends them masked, clearing the reply's arrays. Here the message is turned into zk0's
shape for the node's worker, and the worker's reply into a FitRes whose one array is the node's update
(trained - received, fp32); metrics and records travel beside it, in the clear, as flat scalars.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from ..stats import STATS_KEY
from .messages import NodeReply

FITINS = ("fitins.parameters", "fitins.config")
WEIGHT_KEY = "num-samples"
PACKED = "packed"  # zk0.wire.PACKED; zk0.wire imports torch, which the ClientApp's process does without
NODE_PREFIX, EVAL_PREFIX = "node.", "eval."  # zk0.server.secagg.node_records reads them back


def secagg_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's secaggplus_mod for the messages of a SecAgg+ round; every other train message passes through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secagg_train(msg: Message) -> bool:
    """Whether this train message is the 'collect masked vectors' stage of a SecAgg+ round."""
    return all(key in msg.content for key in FITINS)


def as_zk0(msg: Message) -> np.ndarray:
    """Turn the legacy-shaped message into zk0's (in place); returns the received weights as fp32 (flat)."""
    arrays = list(msg.content["fitins.parameters"].values())
    config = dict(msg.content["fitins.config"])
    stats = config.pop(STATS_KEY, None)
    fmt = str(config.get("wire-format", "fp32"))
    if len(arrays) != 1 or fmt not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"a SecAgg+ round carries one packed fp32, fp16 or bf16 array, not {len(arrays)} in {fmt}")
    for key in FITINS:
        del msg.content[key]
    msg.content["arrays"] = ArrayRecord({PACKED: arrays[0]})
    msg.content["config"] = ConfigRecord(config)
    if stats is not None:
        msg.content[STATS_KEY] = ConfigRecord({"json": stats})
    return as_fp32(np.load(io.BytesIO(arrays[0].data), allow_pickle=False), fmt)


def as_fp32(array: np.ndarray, fmt: str) -> np.ndarray:
    """Packed fp32, fp16 or bf16 weights (bf16 travels as its int16 view, zk0.wire) as fp32."""
    if fmt == "bf16":
        return (np.asarray(array).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(array, dtype=np.float32)


def fit_reply(result: NodeReply, received: np.ndarray, name: str, dataset: str, keep: Path | None, msg: Message,
              ) -> Message:
    """The worker's reply as the FitRes secaggplus_mod masks: the update, its weight, metrics and records."""
    config = msg.content["config"]
    update = as_fp32(result.arrays[PACKED], str(config.get("wire-format", "fp32"))) - received
    server_round = int(config["server-round"])
    if not np.isfinite(update).all():  # the server cannot screen a masked update: a NaN would spoil the sum unseen
        raise ValueError("the update has NaN or Inf values: this node drops out of the SecAgg+ round")
    if keep is not None:  # the lab's own copy of what it contributed: the server cannot show it one
        keep.mkdir(parents=True, exist_ok=True)
        part = keep / f".round-{server_round:03d}.npy.part"
        with open(part, "wb") as f:
            np.save(f, update)
        part.replace(keep / f"round-{server_round:03d}.npy")
    info = {"name": name, "dataset": dataset, "layout": result.layout, **result.info}
    metrics = {k: float(v) for k, v in result.metrics.items()}
    metrics |= {NODE_PREFIX + k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in info.items()}
    metrics |= {EVAL_PREFIX + k: float(v) for k, v in (result.eval_metrics or {}).items()}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([update]), int(result.metrics[WEIGHT_KEY]), metrics)
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
