"""The node's warm worker: same results as a fresh process, stays loaded, and never outlives its node."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array

from zk0.model import frozen_fingerprint, load_policy, trainable_shapes, trainable_state
from zk0.node import warm
from zk0.node.messages import NodeRequest, WorkerExit
from zk0.node.worker import NodeWorker
from zk0.settings import NodeSettings
from zk0.wire import DELTA, PACKED, SCALES, aggregate_deltas, layout_fingerprint, npy_bytes_view, pack


@pytest.fixture
def request_for(demo):
    """Build a request as the ClientApp sends it: node config, message config, weights as .npy bytes."""
    base = str(demo["base-policy"])
    policy = load_policy(base, "cpu")
    arrays = {PACKED: Array(pack(trainable_state(policy), "fp16")).data}
    config = {"wire-format": "fp16", "base-policy": base, "seed": 0, "base-fingerprint": frozen_fingerprint(policy),
              "weights-layout": layout_fingerprint(trainable_shapes(policy)),
              "server-round": 1, "local-steps": 3, "total-steps": 9, "learning-rate": 1e-3, "proximal-mu": 0.01,
              "batch-size": 4, "eval-batches": 1}

    def build(kind: str = "train", **changes) -> NodeRequest:
        node = {"dataset": str(demo["datasets"]["node-0"]), "cameras": demo["cameras"]["node-0"], "torch-threads": 1}
        return NodeRequest(kind, NodeSettings.from_flower_config(node), {**config, **changes}, arrays)

    return build


def worker_pids(owner_pid: int) -> list[int]:
    """Live warm workers started for this owner."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"zk0.node.warm" in args and str(owner_pid).encode() in args and warm._alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def wait_until(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_worker_trains_as_a_fresh_process_does_and_stays_loaded(request_for, owner):
    first = warm.call(request_for(), owner.pid)
    second = warm.call(request_for(), owner.pid)
    fresh = NodeWorker().handle(request_for())
    assert (first.metrics["warm"], second.metrics["warm"], fresh.metrics["warm"]) == (0.0, 1.0, 0.0)
    assert first.arrays.keys() == fresh.arrays.keys()
    for name, array in fresh.arrays.items():
        assert np.array_equal(first.arrays[name], array) and np.array_equal(second.arrays[name], array), name
    assert first.metrics["loss"] == second.metrics["loss"] == fresh.metrics["loss"]
    # A warm message only applies the weights: far less set-up than loading the policy.
    assert second.metrics["setup_seconds"] < first.metrics["setup_seconds"]
    evaluated = warm.call(request_for("evaluate"), owner.pid)
    assert evaluated.arrays is None and evaluated.metrics["warm"] == 1.0
    assert np.isfinite(evaluated.metrics["policy_loss"])
    # ZK0_EVAL_MODE=in-train: a train message that first evaluates the weights it brings trains exactly as
    # one that does not, and reports the evaluate message's figures.
    both = warm.call(request_for(**{"evaluate-first": True}), owner.pid)
    for name, array in fresh.arrays.items():
        assert np.array_equal(both.arrays[name], array), name
    assert both.metrics["loss"] == fresh.metrics["loss"] and fresh.eval_metrics is None
    keys = ("policy_loss", "action_mse", "num-samples")
    assert {k: both.eval_metrics[k] for k in keys} == {k: evaluated.metrics[k] for k in keys}
    assert len(worker_pids(owner.pid)) == 1


def test_worker_reports_a_failed_request_and_serves_the_next(request_for, owner):
    with pytest.raises(warm.WorkerError, match="BaseMismatchError: .*fingerprint.*same base"):
        warm.call(request_for(**{"base-fingerprint": "0123456789abcdef"}), owner.pid)
    assert warm.call(request_for(), owner.pid).metrics["steps"] == 3


def test_worker_exits_with_its_owner(request_for, owner):
    warm.call(request_for("evaluate"), owner.pid)
    (pid,) = worker_pids(owner.pid)
    address = warm.address_for(owner.pid)
    assert address.exists()
    owner.kill()
    owner.wait()
    assert wait_until(lambda: not warm._alive(pid)), "the worker outlived its owner"
    assert not address.exists() and not address.with_suffix(".key").exists()


def test_worker_killed_mid_request_is_named_and_replaced(request_for, owner):
    warm.call(request_for("evaluate"), owner.pid)
    (pid,) = worker_pids(owner.pid)
    errors = []

    def long_train():
        try:
            warm.call(request_for(**{"local-steps": 400, "total-steps": 400}), owner.pid)
        except warm.WorkerError as err:
            errors.append(str(err))

    thread = threading.Thread(target=long_train)
    thread.start()
    time.sleep(2.0)  # the request is sent and training
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=60)
    assert errors and "died during the train request" in errors[0]
    again = warm.call(request_for(), owner.pid)  # a new worker, loaded from scratch
    assert again.metrics["warm"] == 0.0 and worker_pids(owner.pid) != [pid]


def test_client_app_module_does_not_import_torch():
    code = "import sys, zk0.node.client_app; sys.exit(1 if 'torch' in sys.modules else 0)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, "importing the ClientApp pulled in torch: the warm path would pay for it per message"


def test_weights_in_another_layout_or_unknown_requests_are_refused_by_name(request_for):
    worker = NodeWorker()
    with pytest.raises(ValueError, match="layout 0123456789abcdef.*do not match this node's trainable layout"):
        worker.handle(request_for(**{"weights-layout": "0123456789abcdef"}))
    with pytest.raises(ValueError, match="unknown request 'predict'"):
        worker.handle(request_for("predict"))


def test_int8_delta_reply_is_the_update_against_the_received_weights(request_for):
    plain = NodeWorker().handle(request_for())
    delta = NodeWorker().handle(request_for(**{"wire-format": DELTA}))
    assert set(delta.arrays) == {PACKED, SCALES} and delta.arrays[PACKED].dtype == np.int8
    received = npy_bytes_view(request_for().arrays[PACKED]).astype(np.float32)  # fp16 down in both formats
    rebuilt = aggregate_deltas(received, [(delta.arrays, 1.0)])
    trained = plain.arrays[PACKED].astype(np.float32)
    update = trained - received
    assert np.sqrt(np.mean((rebuilt - trained) ** 2)) < 0.02 * np.sqrt(np.mean(update**2))


def test_a_client_without_the_key_is_refused_and_the_worker_serves_on(request_for, owner):
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client

    warm.call(request_for("evaluate"), owner.pid)
    with pytest.raises((AuthenticationError, EOFError, ConnectionResetError)):
        Client(str(warm.address_for(owner.pid)), family="AF_UNIX", authkey=b"not the key").send(WorkerExit())
    assert warm.call(request_for("evaluate"), owner.pid).metrics["warm"] == 1.0


def test_files_of_dead_owners_go_at_the_next_start_and_a_stopped_worker_leaves_none(owner):
    gone = subprocess.Popen(["true"])
    gone.wait()
    # What a SIGKILLed node leaves behind: its worker's socket and key, its start lock.
    stale = [warm.worker_dir() / f"{gone.pid}-0123456789ab{suffix}" for suffix in (".sock", ".key", ".lock")]
    for path in stale:
        path.write_bytes(b"")
    with warm.connect(owner.pid):
        pass
    assert not [path for path in stale if path.exists()]
    (pid,) = worker_pids(owner.pid)
    address = warm.address_for(owner.pid)
    os.kill(pid, signal.SIGTERM)  # as `zk0 local` stops what its nodes started
    assert wait_until(lambda: not warm._alive(pid))
    assert not address.exists() and not address.with_suffix(".key").exists()
