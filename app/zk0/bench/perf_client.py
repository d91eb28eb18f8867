"""One ClientApp training message in a fresh process, timed phase by phase (for `zk0 bench overhead`).

Run as `python -m zk0.bench.perf_client --message FILE ...`; prints one JSON line of phase seconds. It runs
the product's own code for a train message, in the order NodeWorker.handle runs it: import Flower's runtime,
inflate the message, import the app (torch, transformers, LeRobot, zk0), turn the message into the node's
request, open the session (policy, fingerprint, split, processors with the node's camera map and the
message's statistics), receive the weights, open the dataset (and its frozen-feature cache when on), train
and pack the reply's weights, then build and deflate the reply.
"""

import time

# The wall clock lets the parent split start-up from exit.
T0, T0_WALL, T0_CPU = time.perf_counter(), time.time(), time.process_time()

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


def _message(path: str, clock: Clock):
    """Flower's ClientApp runtime imported and the train message inflated, as flwr-clientapp does."""
    import flwr.supernode.runtime.run_clientapp  # noqa: F401  what flwr-clientapp runs
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    clock.mark("import_flwr")
    with open(path, "rb") as f:  # written by our own parent process
        message_id, contents = pickle.load(f)
    msg = inflate_object_from_contents(message_id, contents)
    clock.mark("inflate_message")
    return msg


def _deflated_bytes(reply) -> int:
    """Bytes of the reply's objects as Flower serialises them to send."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(reply).values())


def _result(clock: Clock, steps: int, reply_bytes: int, **extra) -> dict:
    # CPU seconds stand for the wall time an idle host would take where a phase runs on one thread;
    # on a shared host they are the steadier figure.
    cpu = {"process_start": T0_CPU, **clock.cpu}
    return {"phases": clock.phases, "cpu": cpu, "steps": steps, "reply_bytes": reply_bytes, **extra,
            "start_wall": T0_WALL, "in_process_s": time.perf_counter() - T0, "in_process_cpu_s": time.process_time(),
            "end_wall": time.time()}


def run_warm(args: argparse.Namespace) -> dict:
    """A train message as the ClientApp runs it with a warm worker: this process only forwards it."""
    clock = Clock()
    msg = _message(args.message, clock)
    from flwr.app import Context, RecordDict

    from zk0.node import client_app

    clock.mark("import_zk0_app")
    context = Context(run_id=1, node_id=1, node_config=json.loads(args.node_config), state=RecordDict(), run_config={})
    reply = client_app.train(msg, context)
    clock.mark("worker_call")
    reply_bytes = _deflated_bytes(reply)
    clock.mark("serialize_reply")
    metrics = {k: float(v) for k, v in reply.content["metrics"].items()}
    phases, call = clock.phases, clock.phases.pop("worker_call")
    clock.cpu.pop("worker_call")
    # The worker's own clocks split the call: applying weights, waiting for batches, the optimizer steps.
    phases["apply_weights"] = metrics["setup_seconds"]
    phases["train_data_wait"] = metrics["data_seconds"]
    phases["train_compute"] = metrics["train_seconds"] - metrics["data_seconds"]
    phases["worker_transfer"] = call - metrics["setup_seconds"] - metrics["train_seconds"]
    return _result(clock, int(metrics["steps"]), reply_bytes, warm=metrics["warm"])


def run(args: argparse.Namespace) -> dict:
    """The ClientApp's work for one train message in this process (no warm worker), timed phase by phase."""
    clock = Clock()
    msg = _message(args.message, clock)
    import torch  # noqa: F401

    clock.mark("import_torch")
    import transformers  # noqa: F401
    from lerobot.policies.smolvla import modeling_smolvla  # noqa: F401

    clock.mark("import_transformers_lerobot")
    from zk0.node import client_app
    from zk0.node.messages import NodeReply
    from zk0.node.session import receive_weights
    from zk0.node.worker import NodeWorker, train_and_pack
    from zk0.settings import NodeSettings

    clock.mark("import_zk0_app")
    request = client_app.to_request("train", msg, NodeSettings.from_flower_config(json.loads(args.node_config)))
    session = NodeWorker().open(request.settings, request.config)
    clock.mark("open_session")
    session.use_stats(str(request.config.get("norm-stats") or ""))
    received = receive_weights(session, request.arrays, request.config)
    clock.mark("decode_weights")
    session.dataset(session.train_episodes)
    session.image_features(session.train_episodes)
    clock.mark("open_dataset")
    metrics, arrays = train_and_pack(session, request, received)
    clock.mark("train_round")
    reply = client_app.to_reply(NodeReply(metrics, session.layout, session.info, arrays), request.settings.display_name,
                                request.settings.dataset, msg)
    reply_bytes = _deflated_bytes(reply)
    clock.mark("serialize_reply")
    phases = clock.phases
    # train_round's own clock: the loop, split into waiting for batches and everything else; the rest of the
    # phase is setting up the batch stream and packing the trained weights.
    phases["train_data_wait"] = metrics["data_seconds"]
    phases["train_compute"] = metrics["train_seconds"] - metrics["data_seconds"]
    phases["train_setup"] = phases["train_round"] - metrics["train_seconds"]
    return _result(clock, int(metrics["steps"]), reply_bytes)


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
