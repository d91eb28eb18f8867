"""One ClientApp training message in a fresh process, timed phase by phase (for `zk0 bench overhead`).

Run as `python -m zk0.bench.perf_client --message FILE ...`; prints one JSON line of phase seconds. It does
what a Flower ClientApp process does for a train message, in order: import Flower's runtime,
inflate the message, import the app (torch, transformers, LeRobot, zk0), open the session (policy,
fingerprint, split, processors with the node's camera map), switch its processors to the statistics
the message carries, apply the weights, open the dataset, train, and build and deflate the reply.
"""

import time

T0, T0_WALL, T0_CPU = time.perf_counter(), time.time(), time.process_time()  # the wall clock lets the parent split start-up from exit

import argparse  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import sys  # noqa: E402


class Clock:
    """Wall and CPU seconds per phase since the previous mark; the first phase starts at process start."""

    def __init__(self):
        self.phases, self.cpu, self.last, self.last_cpu = {}, {}, T0, T0_CPU

    def mark(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.phases[name], self.cpu[name], self.last, self.last_cpu = now - self.last, cpu - self.last_cpu, now, cpu


def run_warm(args: argparse.Namespace) -> dict:
    """A train message as the ClientApp runs it with a warm worker: this process only forwards it."""
    clock = Clock()
    import flwr.supernode.runtime.run_clientapp  # noqa: F401  what flwr-clientapp runs
    from flwr.app import Context, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    clock.mark("import_flwr")
    with open(args.message, "rb") as f:
        message_id, contents = pickle.load(f)
    msg = inflate_object_from_contents(message_id, contents)
    clock.mark("inflate_message")
    from zk0.node import client_app

    clock.mark("import_zk0_app")
    context = Context(run_id=1, node_id=1, node_config=json.loads(args.node_config), state=RecordDict(), run_config={})
    reply = client_app.train(msg, context)
    clock.mark("worker_call")
    reply_bytes = sum(len(obj.deflate()) for obj in get_all_nested_objects(reply).values())
    clock.mark("serialize_reply")
    metrics = {k: float(v) for k, v in reply.content["metrics"].items()}
    phases, call = clock.phases, clock.phases.pop("worker_call")
    clock.cpu.pop("worker_call")
    # The worker's own clocks split the call: applying weights, waiting for batches, the optimizer steps.
    phases["apply_weights"] = metrics["setup_seconds"]
    phases["train_data_wait"] = metrics["data_seconds"]
    phases["train_compute"] = metrics["train_seconds"] - metrics["data_seconds"]
    phases["worker_transfer"] = call - metrics["setup_seconds"] - metrics["train_seconds"]
    cpu = {"process_start": T0_CPU, **clock.cpu}
    return {"phases": phases, "cpu": cpu, "steps": int(metrics["steps"]), "reply_bytes": reply_bytes, "warm": metrics["warm"],
            "start_wall": T0_WALL, "in_process_s": time.perf_counter() - T0, "in_process_cpu_s": time.process_time(),
            "end_wall": time.time()}


def run(args: argparse.Namespace) -> dict:
    """The ClientApp's work for one train message in this process (no warm worker), timed."""
    clock = Clock()
    import flwr.supernode.runtime.run_clientapp  # noqa: F401  what flwr-clientapp runs
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    clock.mark("import_flwr")
    with open(args.message, "rb") as f:  # written by our own parent process
        message_id, contents = pickle.load(f)
    msg = inflate_object_from_contents(message_id, contents)
    clock.mark("inflate_message")
    import torch  # noqa: F401

    clock.mark("import_torch")
    import transformers  # noqa: F401
    from lerobot.policies.smolvla import modeling_smolvla  # noqa: F401

    clock.mark("import_transformers_lerobot")
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from zk0.data import batch_stream
    from zk0.model import trainable_params
    from zk0.node import client_app  # noqa: F401  the app module, with everything it imports
    from zk0.node.session import open_session, receive_weights
    from zk0.settings import NodeSettings
    from zk0.train import TrainPlan, train_round
    from zk0.wire import PACKED, pack

    clock.mark("import_zk0_app")
    config = msg.content["config"]
    fmt = str(config["wire-format"])
    settings = NodeSettings.from_flower_config(json.loads(args.node_config))
    session = open_session(
        settings, str(config["base-policy"]), None, int(config["seed"]), str(config["base-fingerprint"]),
        str(config.get("norm-stats") or ""),  # federated statistics, built into the processors as the node does
    )
    clock.mark("open_session")
    receive_weights(session, {k: v.data for k, v in msg.content["arrays"].items()}, dict(config))
    clock.mark("decode_weights")
    ds = session.dataset(session.train_episodes)
    batches = batch_stream(ds, int(config["batch-size"]), int(config["seed"]) + 1000, settings.num_workers)
    clock.mark("open_dataset")
    steps = int(config["local-steps"])
    plan = TrainPlan(steps, 0, int(config["total-steps"]), float(config["learning-rate"]), float(config["proximal-mu"]))
    metrics = train_round(session.policy, session.preprocessor, batches, plan)
    clock.mark("train_round")
    content = RecordDict({
        "metrics": MetricRecord({k: float(v) for k, v in metrics.items()}),
        "arrays": ArrayRecord({PACKED: Array(pack(trainable_params(session.policy), fmt))}),
        "node": ConfigRecord({"name": settings.display_name, "dataset": settings.dataset, "layout": session.layout}),
    })
    reply = Message(content=content, reply_to=msg)
    reply_bytes = sum(len(obj.deflate()) for obj in get_all_nested_objects(reply).values())
    clock.mark("serialize_reply")
    phases = clock.phases
    # train_round's own clock: the loop, split into waiting for batches and everything else.
    phases["train_data_wait"] = metrics["data_seconds"]
    phases["train_compute"] = metrics["train_seconds"] - metrics["data_seconds"]
    phases["train_setup"] = phases["train_round"] - metrics["train_seconds"]
    # CPU seconds stand for the wall time an idle host would take where a phase runs on one thread;
    # on a shared host they are the steadier figure.
    cpu = {"process_start": T0_CPU, **clock.cpu}
    return {"phases": phases, "cpu": cpu, "steps": steps, "reply_bytes": reply_bytes, "start_wall": T0_WALL,
            "in_process_s": time.perf_counter() - T0, "in_process_cpu_s": time.process_time(), "end_wall": time.time()}


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, run the message, print the timings as one JSON line."""
    p = argparse.ArgumentParser(prog="python -m zk0.bench.perf_client")
    p.add_argument("--message", required=True, help="pickled (message id, object contents) of a train message")
    p.add_argument("--node-config", required=True, help="the SuperNode's node config as JSON (kebab-case keys)")
    p.add_argument("--warm", action="store_true", help="hand the message to the warm worker of this process's parent")
    args = p.parse_args(argv)
    print(json.dumps(run_warm(args) if args.warm else run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
