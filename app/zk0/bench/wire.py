"""`zk0 bench wire`: what the trainable weights cost on the wire, per format, against the full state dict."""

from __future__ import annotations

import argparse
import gc
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import wire
from .report import MIB, as_record, target
from .wire_tensors import decode, encode, wire_bytes

# What the server's train message carries besides the weights (ServerRuntime.train_config + Flower's keys).
TRAIN_CONFIG = {
    "base-policy": "lerobot/smolvla_base", "base-fingerprint": "0123456789abcdef", "local-steps": 20,
    "total-steps": 60, "batch-size": 8, "learning-rate": 1e-4, "eval-batches": 4, "seed": 0,
    "server-round": 1, "proximal-mu": 0.01,
}
REPLY_METRICS = dict.fromkeys(
    ["loss", "policy_loss", "proximal_loss", "grad_norm", "lr", "steps", "samples", "train_seconds", "num-samples",
     "setup_seconds"], 1.0,
)


def fleet_bytes(msg, direction: str) -> int:
    """Protobuf bytes of the Fleet API calls that move one message in Flower 1.42, chunks and all.

    A message travels as its content-less header plus an object tree, then one call per
    content-addressed object (records, arrays, 5 MiB array chunks), each sent once: the node
    pulls the server's message object by object and pushes its reply the same way.
    """
    from flwr.app.message.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.proto.fleet_pb2 import PullMessagesResponse, PushMessagesRequest
    from flwr.proto.message_pb2 import PullObjectResponse, PushObjectRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
        no_object_id_recompute,
    )

    node, session = Node(node_id=msg.metadata.src_node_id or 2**62), "s" * 36
    with no_object_id_recompute():  # hash each object once, not once per ancestor
        header = dict(messages_list=[message_to_proto(remove_content_from_message(msg))],
                      message_object_trees=[get_object_tree(msg)])
        if direction == "down":
            total = PullMessagesResponse(**header).ByteSize()
            objects = (PullObjectResponse(object_found=True, object_available=True, object_content=obj.deflate())
                       for obj in get_all_nested_objects(msg).values())
        else:
            total = PushMessagesRequest(node=node, clientapp_runtime_list=[1.0], **header).ByteSize()
            objects = (PushObjectRequest(node=node, run_id=msg.metadata.run_id, object_id=oid,
                                         object_content=obj.deflate(), session_id=session)
                       for oid, obj in get_all_nested_objects(msg).items())
        return total + sum(o.ByteSize() for o in objects)


def message_bytes(msg, direction: str, with_proto: bool) -> dict:
    """Serialized bytes of a message: Flower 1.42's transport, and message_to_proto's single protobuf."""
    from flwr.common.serde import message_to_proto
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    # message_to_proto copies the payload several times over; skipped for the 1.7 GB state dict.
    proto = message_to_proto(msg).ByteSize() if with_proto else None
    # objects: one Fleet API call (and SuperLink store write) each
    return {"fleet": fleet_bytes(msg, direction), "proto": proto, "objects": len(get_all_nested_objects(msg))}


def exchange_bytes(record, fmt: str, with_proto: bool = True) -> dict:
    """Serialized bytes of one node's round: the server's train message (down) and the node's reply (up)."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from .models import message

    down = message(RecordDict({"arrays": record, "config": ConfigRecord({**TRAIN_CONFIG, "wire-format": fmt})}))
    node = ConfigRecord({"name": "node-0", "dataset": "someone/so100_dataset"})
    up = message(RecordDict({"metrics": MetricRecord(REPLY_METRICS), "arrays": record, "node": node}), reply_to=down)
    return {"down": message_bytes(down, "down", with_proto), "up": message_bytes(up, "up", with_proto)}


def format_error(state: Mapping[str, torch.Tensor], fmt: str) -> tuple[float, float]:
    """Max and mean absolute error one encode/decode round trip adds, tensor by tensor."""
    worst, total, count = 0.0, 0.0, 0
    for name, value in state.items():
        diff = (decode(encode({name: value}, fmt), fmt)[name] - value).abs()
        worst, total, count = max(worst, diff.max().item()), total + diff.double().sum().item(), count + diff.numel()
    return worst, total / count


def update_error(state: Mapping[str, torch.Tensor], fmt: str, scale: float) -> dict:
    """RMS error of one round's update as the server gets it, relative to the update's RMS.

    A node starts from the 16-bit global g16 = q(g) and trains an update d. Sent as weights, the
    server's new global is q(g16 + d), off from g + d by two roundings at the weights' scale; sent
    as a delta it is g + q(d), off by one rounding at the update's scale.
    """
    def q(t: torch.Tensor) -> torch.Tensor:
        return decode(encode({"t": t}, fmt), fmt)["t"]

    g = torch.Generator().manual_seed(0)
    sq = {"weights": 0.0, "delta": 0.0, "update": 0.0}
    for value in state.values():
        d = scale * torch.randn(value.shape, generator=g)
        sq["weights"] += (q(q(value) + d) - (value + d)).double().pow(2).sum().item()
        sq["delta"] += (q(d) - d).double().pow(2).sum().item()
        sq["update"] += d.double().pow(2).sum().item()
    return {k: math.sqrt(sq[k] / sq["update"]) for k in ("weights", "delta")}


LORA_LABELS = {"fedit": "lora fedit r8", "ffa": "lora ffa r8"}


def lora_states(policy) -> dict[str, dict[str, torch.Tensor]]:
    """The adapters that travel with ZK0_TRAINABLE=lora at LeRobot's default targets, rank 8 (wraps `policy`)."""
    from ..lora import Adapter, wrap
    from ..model import trainable_state

    adapters = trainable_state(wrap(policy, "bench", Adapter("lora"), seed=0))
    return {LORA_LABELS["fedit"]: adapters, LORA_LABELS["ffa"]: {k: v for k, v in adapters.items() if ".lora_B." in k}}


@dataclass
class _Payloads:
    """Per payload: bytes of its values, its messages' serialized bytes, the max and mean error of its format."""

    values: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, dict] = field(default_factory=dict)
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)

    def add(self, name: str, values: int, sizes: dict, errors: tuple[float, float]) -> None:
        self.values[name], self.sizes[name], self.errors[name] = values, sizes, errors


DELTA_NAME = "trainable int8-delta (up: update)"
PER_TENSOR = "trainable fp16, one array per tensor (before packing)"


def _random_delta(n: int) -> np.ndarray:
    """One round's update at peak LR (~20 AdamW steps x 1e-4), flat: what an int8-delta reply quantizes."""
    return (2e-3 * torch.randn(n, generator=torch.Generator().manual_seed(1))).numpy()


def _add_trainable(p: _Payloads, trainable: dict[str, torch.Tensor]) -> float:
    """The expert's payloads per format and as an int8 update; returns the update's relative RMS error."""
    for fmt in wire.FORMATS:
        encoded = {wire.PACKED: wire.pack(trainable, fmt)}  # as zk0 sends it: one packed array
        p.add(f"trainable {fmt}", wire_bytes(encoded), exchange_bytes(as_record(encoded), fmt),
              format_error(trainable, fmt))
        del encoded
        gc.collect()
    # int8-delta: fp16 weights down, a node's update up as int8 with one scale per block; its error is relative
    # to that update.
    update = _random_delta(sum(v.numel() for v in trainable.values()))
    quantized = wire.quantize_delta(update)
    diff = np.abs(wire.aggregate_deltas(np.zeros_like(update), [(quantized, 1.0)]) - update)
    sizes = {"down": p.sizes["trainable fp16"]["down"], "up": exchange_bytes(as_record(quantized), wire.DELTA)["up"]}
    p.add(DELTA_NAME, wire_bytes(quantized), sizes, (float(diff.max()), float(diff.mean())))
    return float(np.sqrt(np.mean(diff**2)) / np.sqrt(np.mean(update**2)))


def _add_lora(p: _Payloads, lora: dict[str, dict[str, torch.Tensor]]) -> None:
    """The LoRA adapters' payloads at fp32 and fp16, and as an int8 update (fp16 down)."""
    for label, adapters in lora.items():
        for fmt in ("fp32", "fp16"):
            encoded = {wire.PACKED: wire.pack(adapters, fmt)}
            p.add(f"{label} {fmt}", wire_bytes(encoded), exchange_bytes(as_record(encoded), fmt),
                  format_error(adapters, fmt))
        quantized = wire.quantize_delta(_random_delta(sum(v.numel() for v in adapters.values())))
        sizes = {"down": p.sizes[f"{label} fp16"]["down"], "up": exchange_bytes(as_record(quantized), wire.DELTA)["up"]}
        p.add(f"{label} int8-delta (up)", wire_bytes(quantized), sizes, p.errors[f"{label} fp16"])


def _largest(sizes: dict) -> int:
    """The larger message of a payload's two directions, in its largest serialization."""
    return max(v for d in ("down", "up") for k, v in sizes[d].items() if v is not None and k != "objects")


def _wire_targets(p: _Payloads) -> list[dict]:
    ref = _largest(p.sizes["full state dict fp32"])
    targets = []
    for fmt in ("fp16", "bf16"):
        big = _largest(p.sizes[f"trainable {fmt}"])
        targets.append(target(f"{fmt}: largest message per node per direction (MiB)", big / MIB, 200, True, " MiB"))
        targets.append(target(f"{fmt}: times smaller than the full fp32 state dict", ref / big, 8.5, False, "x"))
    up = p.sizes[DELTA_NAME]["up"]["fleet"]
    targets.append(target("int8-delta: reply (up) per node per round (MiB)", up / MIB, 200, True, " MiB"))
    lora_fp16 = _largest(p.sizes[f"{LORA_LABELS['fedit']} fp16"])
    targets.append(target("LoRA defaults fp16: largest message per node per direction (MiB)", lora_fp16 / MIB, 8,
                          True, " MiB"))
    targets.append(target("LoRA defaults fp16: times smaller than the expert at fp16",
                          _largest(p.sizes["trainable fp16"]) / lora_fp16, 24, False, "x"))
    return targets


def _wire_tables(p: _Payloads, updates: dict, total: int, n_trainable: int) -> list[dict]:
    ref = _largest(p.sizes["full state dict fp32"])

    def mib(v):
        return "n/a" if v is None else v / MIB

    rows = [
        [name, p.values[name] / MIB, mib(s["down"]["fleet"]), mib(s["down"]["proto"]), mib(s["up"]["fleet"]),
         mib(s["up"]["proto"]), s["down"]["objects"], ref / _largest(s), *p.errors[name]]
        for name, s in p.sizes.items()
    ]
    return [{
        "title": f"per node, per direction, per round ({total / 1e6:.2f}M params, {n_trainable / 1e6:.2f}M trainable; "
                 "MiB; fleet = protobuf bytes of Flower 1.42's Fleet API calls for the message, "
                 "proto = message_to_proto(msg).ByteSize())",
        "headers": ["payload", "values", "down fleet", "down proto", "up fleet", "up proto", "objects", "x smaller",
                    "max abs err", "mean abs err"],
        "rows": rows,
    }, {
        "title": "error of one round's update as the server receives it, relative to the update (RMS): "
                 "sent as weights vs as a delta",
        "headers": ["format", "update RMS", "as weights", "as delta"],
        "rows": [[f, sc, e["weights"], e["delta"]] for (f, sc), e in updates.items()],
    }]


def _wire_notes(delta_rms: float) -> list[str]:
    return ["Flower sends identical arrays once (content-addressed), so a state dict with repeated tensors "
            "(e.g. norm weights still at 1) can serialize to slightly less than its values",
            "rounds with node evaluation send the weights down once more, in the evaluate message "
            "(same size as 'down')",
            "errors are over the random initial weights (kaiming-uniform, scale ~0.03); int8-delta's over a "
            f"random update of RMS 2e-3, relative RMS error {delta_rms:.4f}",
            "int8-delta moves up half the bytes of fp16; the server adds the weighted mean update to its fp32 model",
            "LoRA rows: LeRobot's SmolVLA targets at rank 8 (ZK0_TRAINABLE=lora); fedit sends A and B, ffa only B "
            "(A frozen and shared); the int8-delta rows' errors are the fp16 down-link's"]


def _payloads(smoke: bool) -> tuple[_Payloads, dict, int, dict, float]:
    """Every payload's figures; the trainable weights, the policy's parameter count, its LoRA adapters and the
    int8-delta update's relative RMS error."""
    from ..model import trainable_state
    from .models import build_policy

    with tempfile.TemporaryDirectory() as tmp:
        policy = build_policy(Path(tmp), full=not smoke)
    total, trainable = sum(p.numel() for p in policy.parameters()), trainable_state(policy)
    state = policy.state_dict()
    p = _Payloads()
    full_values = sum(v.numel() * v.element_size() for v in state.values())
    full_record = as_record({k: v.detach().cpu().numpy() for k, v in state.items()})
    del state
    lora = lora_states(policy)  # wraps the policy in place: measured after the full state dict
    del policy
    gc.collect()
    p.add("full state dict fp32", full_values, exchange_bytes(full_record, "fp32", with_proto=False), (0.0, 0.0))
    del full_record
    delta_rms = _add_trainable(p, trainable)
    _add_lora(p, lora)
    p.add(PER_TENSOR, p.values["trainable fp16"], exchange_bytes(as_record(encode(trainable, "fp16")), "fp16"),
          p.errors["trainable fp16"])
    return p, trainable, total, lora, delta_rms


def bench_wire(args: argparse.Namespace) -> dict:
    """Bytes per node per direction per round for the full state dict and the trainable weights per format."""
    p, trainable, total, lora, delta_rms = _payloads(args.smoke)
    n_trainable = sum(v.numel() for v in trainable.values())
    # Per-weight update of one round: ~steps x lr with AdamW, at peak LR (1e-4 x 20) and decayed (2.5e-6 x 20).
    updates = {(fmt, scale): update_error(trainable, fmt, scale) for fmt in ("fp16", "bf16") for scale in (2e-3, 5e-5)}
    architecture = "scaled-down" if args.smoke else "full-size SmolVLA (SmolVLM2-500M, 16 layers)"
    return {
        "benchmark": "wire",
        "settings": {"smoke": args.smoke, "architecture": architecture},
        "params": {"total": total, "trainable": n_trainable,
                   **{label: sum(v.numel() for v in a.values()) for label, a in lora.items()}},
        "payloads": {name: {"values_bytes": p.values[name], **p.sizes[name], "max_abs_error": p.errors[name][0],
                            "mean_abs_error": p.errors[name][1]} for name in p.sizes},
        "tables": _wire_tables(p, updates, total, n_trainable),
        "update_error": [{"fmt": f, "update_rms": sc, **e} for (f, sc), e in updates.items()],
        "int8_delta_update_rms_error": delta_rms,
        "targets": _wire_targets(p),
        "notes": _wire_notes(delta_rms),
    }
