"""A node's train reply as zk0's ClientApp packs it, for the strategy tests (no Flower run needed)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from zk0.wire import DELTA, PACKED, layout_fingerprint, pack, quantize_delta


def packed_reply(node_id: int, state: dict, samples: float, fmt: str, shapes: dict,
                 base: np.ndarray | None = None) -> Message:
    """`state` (tensors or arrays) packed in `fmt` (int8-delta against `base`), claiming `samples`."""
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    state = {k: torch.as_tensor(v) for k, v in state.items()}
    flat = pack(state, "fp32" if fmt == DELTA else fmt)
    arrays = quantize_delta(flat - base) if fmt == DELTA else {PACKED: flat}
    return Message(content=RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-samples": samples, "loss": float(node_id)}),
        "node": ConfigRecord({"name": f"node-{node_id}", "layout": layout_fingerprint(shapes)}),
    }), reply_to=request)
