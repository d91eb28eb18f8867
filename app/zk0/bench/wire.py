"""`zk0 bench wire` and `zk0 bench aggregate`: what the trainable weights cost on the wire and on the server."""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from .. import wire
from ..wire import npy_view
from .report import MIB, as_record, target

NODE_WEIGHTS = [160.0, 240.0, 200.0, 80.0]  # samples trained by four nodes: unequal on purpose
# What the server's train message carries besides the weights (ServerRuntime.train_config + Flower's keys).
TRAIN_CONFIG = {
    "base-policy": "lerobot/smolvla_base", "base-fingerprint": "0123456789abcdef", "local-steps": 20,
    "total-steps": 60, "batch-size": 8, "learning-rate": 1e-4, "eval-batches": 4, "seed": 0,
    "server-round": 1, "proximal-mu": 0.01,
}
REPLY_METRICS = dict.fromkeys(
    ["loss", "policy_loss", "proximal_loss", "grad_norm", "lr", "steps", "samples", "train_seconds", "num-samples", "setup_seconds"], 1.0
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
        header = dict(messages_list=[message_to_proto(remove_content_from_message(msg))], message_object_trees=[get_object_tree(msg)])
        if direction == "down":
            total = PullMessagesResponse(**header).ByteSize()
            objects = (PullObjectResponse(object_found=True, object_available=True, object_content=obj.deflate())
                       for obj in get_all_nested_objects(msg).values())
        else:
            total = PushMessagesRequest(node=node, clientapp_runtime_list=[1.0], **header).ByteSize()
            objects = (PushObjectRequest(node=node, run_id=msg.metadata.run_id, object_id=oid, object_content=obj.deflate(),
                                         session_id=session) for oid, obj in get_all_nested_objects(msg).items())
        return total + sum(o.ByteSize() for o in objects)


def message_bytes(msg, direction: str, with_proto: bool) -> dict:
    """Serialized bytes of a message: Flower 1.42's transport, and message_to_proto's single protobuf."""
    from flwr.common.serde import message_to_proto
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    # message_to_proto copies the payload several times over; skipped for the 1.7 GB state dict.
    return {"fleet": fleet_bytes(msg, direction), "proto": message_to_proto(msg).ByteSize() if with_proto else None,
            "objects": len(get_all_nested_objects(msg))}  # one Fleet API call (and SuperLink store write) each


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
        diff = (wire.decode(wire.encode({name: value}, fmt), fmt)[name] - value).abs()
        worst, total, count = max(worst, diff.max().item()), total + diff.double().sum().item(), count + diff.numel()
    return worst, total / count


def update_error(state: Mapping[str, torch.Tensor], fmt: str, scale: float) -> dict:
    """RMS error of one round's update as the server gets it, relative to the update's RMS.

    A node starts from the 16-bit global g16 = q(g) and trains an update d. Sent as weights, the
    server's new global is q(g16 + d), off from g + d by two roundings at the weights' scale; sent
    as a delta it is g + q(d), off by one rounding at the update's scale.
    """
    q = lambda t: wire.decode(wire.encode({"t": t}, fmt), fmt)["t"]
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
    """The adapters that travel with ZK0_TRAINABLE=lora at LeRobot's default targets, rank 8 (wraps `policy` in place)."""
    from ..lora import Adapter, wrap
    from ..model import trainable_state

    adapters = trainable_state(wrap(policy, "bench", Adapter("lora"), seed=0))
    return {LORA_LABELS["fedit"]: adapters, LORA_LABELS["ffa"]: {k: v for k, v in adapters.items() if ".lora_B." in k}}


def bench_wire(args: argparse.Namespace) -> dict:
    """Bytes per node per direction per round for the full state dict and the trainable weights per format."""
    from ..model import trainable_state
    from .models import build_policy

    with tempfile.TemporaryDirectory() as tmp:
        policy = build_policy(Path(tmp), full=not args.smoke)
    total, trainable = sum(p.numel() for p in policy.parameters()), trainable_state(policy)
    state = policy.state_dict()
    values = {"full state dict fp32": sum(v.numel() * v.element_size() for v in state.values())}
    full_record = as_record({k: v.detach().cpu().numpy() for k, v in state.items()})
    del state
    lora = lora_states(policy)  # wraps the policy in place: measured after the full state dict
    del policy
    gc.collect()
    sizes = {"full state dict fp32": exchange_bytes(full_record, "fp32", with_proto=False)}
    errors = {"full state dict fp32": (0.0, 0.0)}
    del full_record
    for fmt in wire.FORMATS:
        name = f"trainable {fmt}"
        encoded = {wire.PACKED: wire.pack(trainable, fmt)}  # as zk0 sends it: one packed array
        values[name] = wire.wire_bytes(encoded)
        sizes[name] = exchange_bytes(as_record(encoded), fmt)
        errors[name] = format_error(trainable, fmt)
        del encoded
        gc.collect()
    # int8-delta: fp16 weights down, a node's update up as int8 with one scale per block. The update is
    # one round's worth at peak LR (~20 AdamW steps x 1e-4); its error is relative to that update.
    delta_name = "trainable int8-delta (up: update)"
    update = (2e-3 * torch.randn(sum(v.numel() for v in trainable.values()), generator=torch.Generator().manual_seed(1))).numpy()
    quantized = wire.quantize_delta(update)
    values[delta_name] = wire.wire_bytes(quantized)
    sizes[delta_name] = {"down": sizes["trainable fp16"]["down"], "up": exchange_bytes(as_record(quantized), wire.DELTA)["up"]}
    diff = np.abs(wire.aggregate_deltas(np.zeros_like(update), [(quantized, 1.0)]) - update)
    errors[delta_name] = (float(diff.max()), float(diff.mean()))
    delta_rms = float(np.sqrt(np.mean(diff**2)) / np.sqrt(np.mean(update**2)))
    del quantized, diff, update
    for label, adapters in lora.items():
        for fmt in ("fp32", "fp16"):
            encoded = {wire.PACKED: wire.pack(adapters, fmt)}
            values[f"{label} {fmt}"], sizes[f"{label} {fmt}"] = wire.wire_bytes(encoded), exchange_bytes(as_record(encoded), fmt)
            errors[f"{label} {fmt}"] = format_error(adapters, fmt)
        n = sum(v.numel() for v in adapters.values())
        quantized = wire.quantize_delta((2e-3 * torch.randn(n, generator=torch.Generator().manual_seed(1))).numpy())
        values[f"{label} int8-delta (up)"] = wire.wire_bytes(quantized)
        sizes[f"{label} int8-delta (up)"] = {"down": sizes[f"{label} fp16"]["down"], "up": exchange_bytes(as_record(quantized), wire.DELTA)["up"]}
        errors[f"{label} int8-delta (up)"] = errors[f"{label} fp16"]
    per_tensor = "trainable fp16, one array per tensor (before packing)"
    values[per_tensor] = values["trainable fp16"]
    sizes[per_tensor], errors[per_tensor] = exchange_bytes(as_record(wire.encode(trainable, "fp16")), "fp16"), errors["trainable fp16"]
    big = lambda s: max(v for d in ("down", "up") for k, v in s[d].items() if v is not None and k != "objects")
    ref = big(sizes["full state dict fp32"])
    mib = lambda v: "n/a" if v is None else v / MIB
    rows = [
        [name, values[name] / MIB, mib(s["down"]["fleet"]), mib(s["down"]["proto"]), mib(s["up"]["fleet"]),
         mib(s["up"]["proto"]), s["down"]["objects"], ref / big(s), *errors[name]]
        for name, s in sizes.items()
    ]
    n_trainable = sum(v.numel() for v in trainable.values())
    # Per-weight update of one round: ~steps x lr with AdamW, at peak LR (1e-4 x 20) and decayed (2.5e-6 x 20).
    updates = {(fmt, scale): update_error(trainable, fmt, scale) for fmt in ("fp16", "bf16") for scale in (2e-3, 5e-5)}
    targets = []
    for fmt in ("fp16", "bf16"):
        s = sizes[f"trainable {fmt}"]
        targets.append(target(f"{fmt}: largest message per node per direction (MiB)", big(s) / MIB, 200, True, " MiB"))
        targets.append(target(f"{fmt}: times smaller than the full fp32 state dict", ref / big(s), 8.5, False, "x"))
    up = sizes[delta_name]["up"]["fleet"]
    targets.append(target("int8-delta: reply (up) per node per round (MiB)", up / MIB, 200, True, " MiB"))
    lora_fp16 = big(sizes[f"{LORA_LABELS['fedit']} fp16"])
    targets.append(target("LoRA defaults fp16: largest message per node per direction (MiB)", lora_fp16 / MIB, 8, True, " MiB"))
    targets.append(target("LoRA defaults fp16: times smaller than the expert at fp16", big(sizes["trainable fp16"]) / lora_fp16, 24, False, "x"))
    return {
        "benchmark": "wire",
        "settings": {"smoke": args.smoke, "architecture": "scaled-down" if args.smoke else "full-size SmolVLA (SmolVLM2-500M, 16 layers)"},
        "params": {"total": total, "trainable": n_trainable, **{label: sum(v.numel() for v in a.values()) for label, a in lora.items()}},
        "payloads": {name: {"values_bytes": values[name], **sizes[name], "max_abs_error": errors[name][0],
                            "mean_abs_error": errors[name][1]} for name in sizes},
        "tables": [{
            "title": f"per node, per direction, per round ({total / 1e6:.2f}M params, {n_trainable / 1e6:.2f}M trainable; MiB; "
                     "fleet = protobuf bytes of Flower 1.42's Fleet API calls for the message, proto = message_to_proto(msg).ByteSize())",
            "headers": ["payload", "values", "down fleet", "down proto", "up fleet", "up proto", "objects", "x smaller", "max abs err",
                        "mean abs err"],
            "rows": rows,
        }, {
            "title": "error of one round's update as the server receives it, relative to the update (RMS): sent as weights vs as a delta",
            "headers": ["format", "update RMS", "as weights", "as delta"],
            "rows": [[f, sc, e["weights"], e["delta"]] for (f, sc), e in updates.items()],
        }],
        "update_error": [{"fmt": f, "update_rms": sc, **e} for (f, sc), e in updates.items()],
        "int8_delta_update_rms_error": delta_rms,
        "targets": targets,
        "notes": ["Flower sends identical arrays once (content-addressed), so a state dict with repeated tensors "
                  "(e.g. norm weights still at 1) can serialize to slightly less than its values",
                  "rounds with node evaluation send the weights down once more, in the evaluate message (same size as 'down')",
                  "errors are over the random initial weights (kaiming-uniform, scale ~0.03); int8-delta's over a "
                  f"random update of RMS 2e-3, relative RMS error {delta_rms:.4f}",
                  "int8-delta moves up half the bytes of fp16; the server adds the weighted mean update to its fp32 model",
                  "LoRA rows: LeRobot's SmolVLA targets at rank 8 (ZK0_TRAINABLE=lora); fedit sends A and B, ffa only B "
                  "(A frozen and shared); the int8-delta rows' errors are the fp16 down-link's"],
    }


def _random_update(shapes: dict[str, tuple], fmt: str, seed: int) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    return {k: wire.encode({k: 0.02 * torch.randn(s, generator=g)}, fmt)[k] for k, s in shapes.items()}


class _ArrayView(Mapping):
    """An ArrayRecord seen as numpy arrays, one at a time on access (as the strategy reads replies)."""

    def __init__(self, record, zero_copy: bool):
        self.record, self.zero_copy = record, zero_copy

    def __getitem__(self, key):
        return npy_view(self.record[key]) if self.zero_copy else self.record[key].numpy()

    def __iter__(self):
        return iter(self.record)

    def __len__(self):
        return len(self.record)


class _RssPeak:
    """Samples this process's resident memory every millisecond while a block runs."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def measure(fn: Callable[[], object], repeats: int) -> dict:
    """Median and min seconds of `fn` over repeats, then its peak memory above the starting point."""
    seconds = []
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - started)
        del out
    gc.collect()
    with _RssPeak() as rss:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        del out
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "seconds": seconds,
            "tracemalloc_peak": peak, "rss_peak": rss.peak - rss.base}


def bench_aggregate(args: argparse.Namespace) -> dict:
    """Decode and weighted-average four trainable updates in fp32 on the server: time and peak memory."""
    from .models import build_policy

    with tempfile.TemporaryDirectory() as tmp:
        meta = build_policy(Path(tmp), full=not args.smoke, meta=True)
    shapes = {n: tuple(p.shape) for n, p in meta.named_parameters() if p.requires_grad}
    copy = 4 * sum(math.prod(s) for s in shapes.values())  # one fp32 copy of the trainable weights
    updates = [(_random_update(shapes, args.fmt, seed=i), w) for i, w in enumerate(NODE_WEIGHTS)]
    inputs = sum(wire.wire_bytes(u) for u, _ in updates)
    repeats = 1 if args.smoke else args.repeats
    runs = {"numpy arrays": measure(lambda: wire.aggregate(updates, args.fmt), repeats)}
    # What the strategy does since weights travel packed: one flat array per reply, split by name after.
    packed = [({wire.PACKED: np.concatenate([u[k].reshape(-1) for k in sorted(u)])}, w) for u, w in updates]
    runs["packed replies (as the strategy aggregates)"] = measure(
        lambda: wire.unpack(wire.aggregate(packed, args.fmt)[wire.PACKED], shapes), repeats)
    del packed
    records = [(as_record(u), w) for u, w in updates]
    del updates
    gc.collect()
    for zero_copy, how in ((False, "Array.numpy()"), (True, "zero-copy npy_view")):
        views = [(_ArrayView(r, zero_copy), w) for r, w in records]
        runs[f"ArrayRecord replies, {how}"] = measure(lambda: wire.aggregate(views, args.fmt), repeats)
    rows = [[name, r["median_s"], r["min_s"], r["tracemalloc_peak"] / copy, r["rss_peak"] / copy] for name, r in runs.items()]
    main = runs["numpy arrays"]
    return {
        "benchmark": "aggregate",
        "settings": {"smoke": args.smoke, "fmt": args.fmt, "nodes": len(NODE_WEIGHTS), "repeats": repeats},
        "trainable_params": copy // 4,
        "copy_bytes": copy,
        "inputs_copies": inputs / copy,
        "runs": runs,
        "tables": [{
            "title": f"aggregate {len(NODE_WEIGHTS)} {args.fmt} updates of {copy / 4e6:.2f}M params into fp32 "
                     f"(1 copy = {copy / MIB:.0f} MiB; the inputs, {inputs / copy:.2f} copies, are held before and not counted)",
            "headers": ["inputs", "median s", "min s", "peak copies (tracemalloc)", "peak copies (RSS)"],
            "rows": rows,
        }],
        "targets": [
            target("server aggregation time, median (s)", main["median_s"], 3.0, True, " s"),
            target("packed aggregation time, median (s)", runs["packed replies (as the strategy aggregates)"]["median_s"],
                   3.0, True, " s"),
            target("aggregation peak memory above the inputs (copies, tracemalloc)", main["tracemalloc_peak"] / copy, 3.0, True),
            target("aggregation peak memory above the inputs (copies, RSS)", main["rss_peak"] / copy, 3.0, True),
        ],
        "notes": ["tracemalloc sees numpy's allocations (the fp32 result; torch only views them); RSS is sampled every ms"],
    }
