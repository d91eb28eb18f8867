"""What the docs promise about restarts, security and the warm worker (docs/deployment.md, docs/learning.md),
with real processes, files and sockets on loopback: each test runs only the parts its claim is about (no
federation of its own)."""

from __future__ import annotations

import http.client
import inspect
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
from federation import ZK0
from loopback import SuperLink, alive, pids_with, stub_app, wait_until

from zk0.deploy.local import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAKE_CERTS = ROOT / "superlink" / "make-certs.sh"


def make_certs(*args: str) -> None:
    subprocess.run([str(MAKE_CERTS), *args], check=True, capture_output=True, timeout=120)


# --- superlink/make-certs.sh -----------------------------------------------------------------------


def test_make_certs_reruns_keep_files_add_nodes_and_reissue_only_for_new_names(tmp_path):
    certs = tmp_path / "certs"
    make_certs("-n", "1", str(certs), "superlink.lab.example")
    names = ["ca.crt", "ca.key", "superlink.crt", "superlink.key", "supernodes/node-0", "supernodes/node-0.pub"]
    first = {name: (certs / name).read_bytes() for name in names}
    make_certs("-n", "2", str(certs), "superlink.lab.example")  # the same names, one node more
    assert {name: (certs / name).read_bytes() for name in names} == first
    added = (certs / "supernodes" / "node-1.pub").read_bytes()
    assert added.startswith(b"ecdsa-sha2-nistp384 ") and added != first["supernodes/node-0.pub"]
    make_certs("-n", "2", str(certs), "superlink.lab.example", "10.0.0.7")  # a new name for the SuperLink
    now = {name: (certs / name).read_bytes() for name in names}
    assert now["superlink.crt"] != first["superlink.crt"]
    others_now = {n: v for n, v in now.items() if not n.startswith("superlink")}
    assert others_now == {n: v for n, v in first.items() if not n.startswith("superlink")}
    assert (certs / "supernodes" / "node-1.pub").read_bytes() == added
    text = subprocess.run(["openssl", "x509", "-in", str(certs / "superlink.crt"), "-noout", "-ext", "subjectAltName"],
                          capture_output=True, text=True, check=True).stdout
    assert "DNS:superlink.lab.example" in text and "IP Address:10.0.0.7" in text
    # Still signed by the CA the nodes were given.
    subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / "superlink.crt")], check=True,
                   capture_output=True)


# --- a real SuperLink on loopback --------------------------------------------------------------------


def test_tls_superlink_refuses_plaintext_at_the_handshake_and_strangers_at_authentication(tmp_path):
    certs = tmp_path / "certs"
    make_certs("-n", "1", str(certs))  # node-0's key is never registered
    node = ["--max-retries", "1", "--max-wait-time", "30"]
    with SuperLink(tmp_path, tls=certs) as link:
        # The port speaks only TLS: plain HTTP gets no answer at all, HTTPS with the federation's CA gets one.
        plain = http.client.HTTPConnection("127.0.0.1", link.port, timeout=60)
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            plain.request("GET", "/")
            plain.getresponse()
        secure = http.client.HTTPSConnection("127.0.0.1", link.port, timeout=60,
                                             context=ssl.create_default_context(cafile=str(certs / "ca.crt")))
        secure.request("GET", "/")
        assert 100 <= secure.getresponse().status < 600
        # Flower exits with 305 for both refusals; its reason tells them apart.
        refusals = {}
        for name, args in {
            "plaintext": ["--insecure"],
            "stranger": ["--root-certificates", str(certs / "ca.crt"), "--auth-supernode-private-key",
                         str(certs / "supernodes" / "node-0")],
        }.items():
            # Output to a file: the SuperNode's SuperExec outlives it and would hold a pipe open. The
            # SuperLink's mark in its environment lets leaving the block end that SuperExec too.
            output = tmp_path / f"{name}.log"
            with open(output, "wb") as sink:
                code = subprocess.run([str(BIN / "flower-supernode"), *args, "--superlink", link.address, *node,
                                       "--port", str(free_port())], env=link.env, stdout=sink, stderr=subprocess.STDOUT,
                                      timeout=300).returncode
            refusals[name] = output.read_text(errors="replace")
            assert code != 0 and "Exit Code: 305" in refusals[name], refusals[name]
    assert "Server disconnected without sending a response" in refusals["plaintext"]
    assert "Failed to activate SuperNode" not in refusals["plaintext"]
    assert "[code: 2004] Failed to activate SuperNode" in refusals["stranger"]  # past TLS, refused by node auth
    assert "SSL" not in refusals["stranger"] and "disconnected" not in refusals["stranger"]


# --- zk0 submit resubmits a run lost to a SuperLink restart ----------------------------------------

def test_submit_resubmits_a_run_that_a_superlink_restart_failed(demo, tmp_path, monkeypatch, caplog):
    from zk0.deploy import flwr_cli, submit

    state = tmp_path / "state"
    state.mkdir()
    app = stub_app(tmp_path / "app")
    env_file = tmp_path / "experiment.env"
    env_file.write_text(f"ZK0_BASE_POLICY={demo['base-policy']}\nZK0_OUTPUT_DIR={tmp_path / 'out'}\n")
    # What `zk0 submit` saw, in order: the test restarts the SuperLink only once it saw it gone.
    statuses: list[str] = []
    real_status = flwr_cli.run_status
    monkeypatch.setattr(flwr_cli, "run_status", lambda *a: statuses.append(real_status(*a)) or statuses[-1])
    monkeypatch.setattr(logging.getLogger("zk0"), "propagate", True)  # to caplog, whatever set up logging before

    def started() -> list[str]:
        return sorted(p.name.removeprefix("started-") for p in state.glob("started-*"))

    with SuperLink(tmp_path, STUB_STATE=str(state)) as link, caplog.at_level("INFO", logger="zk0"):
        result = {}

        def follow():
            result.update(code=submit.submit_and_wait(link.address, env_file, app, poll=0.5))

        follower = threading.Thread(target=follow, daemon=True)  # a failed test must not leave pytest waiting for it
        follower.start()
        try:
            (first,) = wait_until(started, 300, "the first run's ServerApp")
            link.kill()  # the SuperLink's host goes down mid-run ...
            seen = len(statuses)
            wait_until(lambda: "" in statuses[seen:], 120, "zk0 submit to find the SuperLink gone")
            link.start()  # ... and comes back with its database
            second = wait_until(lambda: [r for r in started() if r != first], 300, "the run submitted again")[0]
        finally:
            (state / "release").touch()  # every ServerApp of the stub may now finish
            follower.join(timeout=300)
    assert result == {"code": 0}, caplog.text[-3000:]
    assert f"run {first} failed while the SuperLink was away; submitting again" in caplog.text
    assert f"run {second}: finished:completed" in caplog.text
    assert "without TLS" in caplog.text  # no --root-certificates: the user is warned


# --- the output folder's single writer ---------------------------------------------------------------

LOCK_HOLDER = (
    "import sys; from pathlib import Path; from zk0.server.runtime import lock_output; "
    "lock_output(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()"
)


@pytest.mark.slow  # waits on another process's lock for about 20 s
def test_one_serverapp_writes_an_output_folder_and_the_next_waits_for_it(tmp_path):
    from zk0.server import runtime as server
    from zk0.settings import SettingsError

    out = tmp_path / "out"
    assert inspect.signature(server.lock_output).parameters["timeout"].default == 300  # "waits up to 5 minutes"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    acquired = threading.Event()
    try:
        assert holder.stdout.readline() == "locked\n"
        waiter = threading.Thread(target=lambda: (server.lock_output(out), acquired.set()), daemon=True)
        waiter.start()  # a ServerApp resubmitted while the first one is still finishing
        started = time.monotonic()
        with pytest.raises(SettingsError, match=re.escape(f"{out} is in use by another ServerApp for more than 1s")):
            server.lock_output(out, timeout=1)
        assert time.monotonic() - started >= 1 and not acquired.is_set()  # both kept out while the first lives
        holder.kill()  # the first ServerApp dies (or exits): the kernel drops its lock
        holder.wait(timeout=60)
        assert acquired.wait(timeout=60), "the waiting ServerApp never took the folder"
    finally:
        if holder.poll() is None:
            holder.kill()
        handle = server._LOCKS.pop((out / ".lock").resolve(), None)
        if handle is not None:
            handle.close()


# --- the insecure mode says so -------------------------------------------------------------------------


def test_runs_without_tls_say_so(finished_run, demo):
    res, out = finished_run  # `zk0 local` without --tls
    assert "no --tls: SuperLink and SuperNodes talk without TLS or node authentication" in res.stderr
    config = tomllib.loads((out / "local" / "flwr-home" / "config.toml").read_text())
    assert config["superlink"]["local"]["insecure"] is True
    env = {**os.environ, "ZK0_DATASET": str(demo["datasets"]["node-0"]), "ZK0_CAMERAS": demo["cameras"]["node-0"]}
    done = subprocess.run([*ZK0, "supernode", "--superlink", f"127.0.0.1:{free_port()}", "--connect-tries", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3 and "no --root-certificates: connecting without TLS" in done.stderr, done.stderr


# --- the warm worker follows the app, the base policy, the dataset files and the settings ---------------


def evaluate_request(base: str, dataset: str, cameras: str, heldout: int = 2):
    """An evaluate request as zk0's ClientApp hands it to the worker."""
    from flwr.app import Array

    from zk0.model import frozen_fingerprint, load_policy, trainable_shapes, trainable_state
    from zk0.node.messages import NodeRequest
    from zk0.wire import PACKED, layout_fingerprint, pack

    policy = load_policy(base, "cpu")
    config = {"wire-format": "fp16", "base-policy": base, "seed": 0, "base-fingerprint": frozen_fingerprint(policy),
              "weights-layout": layout_fingerprint(trainable_shapes(policy)), "batch-size": 4, "eval-batches": 1}
    node = {"dataset": dataset, "cameras": cameras, "heldout-episodes": heldout, "torch-threads": 1}
    return NodeRequest("evaluate", node, config, {PACKED: Array(pack(trainable_state(policy), "fp16")).data})


def rewrite(path: Path) -> None:
    """The same bytes written again, as a re-export or a re-download leaves a file."""
    path.write_bytes(path.read_bytes())  # the copy kept the original's time: this one is new


def test_warm_worker_reloads_for_new_inputs_and_is_replaced_for_another_app(demo, owner, tmp_path, monkeypatch):
    from zk0.node import warm

    base = Path(shutil.copytree(demo["base-policy"], tmp_path / "base"))
    dataset = Path(shutil.copytree(demo["datasets"]["node-0"], tmp_path / "node-0"))
    cameras = demo["cameras"]["node-0"]
    requests = [evaluate_request(str(base), str(dataset), cameras)]  # the last is the one sent

    def warm_flag() -> float:
        return warm.call(requests[-1], owner.pid).metrics["warm"]

    assert (warm_flag(), warm_flag()) == (0.0, 1.0)  # started, then found loaded
    (worker,) = pids_with(f"--owner-pid\0{owner.pid}\0".encode(), "cmdline")
    changes = {
        "node settings": lambda: requests[-1].node_config.update({"heldout-episodes": 1}),
        "dataset files": lambda: rewrite(dataset / "meta" / "info.json"),
        "base policy files": lambda: rewrite(base / "model.safetensors"),
        "base policy": lambda: requests.append(evaluate_request(str(shutil.copytree(base, tmp_path / "base-2")),
                                                                str(dataset), cameras, heldout=1)),
    }
    for what, change in changes.items():
        change()
        assert (warm_flag(), warm_flag()) == (0.0, 1.0), what  # reloaded once, then warm again
    assert pids_with(f"--owner-pid\0{owner.pid}\0".encode(), "cmdline") == [worker]  # one process did all that
    # Another version of the app (Flower installs each in its own folder) gets a worker of its own,
    # and the old worker leaves so that only one holds a policy in memory.
    app = tmp_path / "app-v2"
    shutil.copytree(warm.APP_ROOT / "zk0", app / "zk0", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(warm, "APP_ROOT", app)
    assert warm_flag() == 0.0
    wait_until(lambda: not alive(worker), 60, "the old app's worker to exit")
    (replacement,) = pids_with(f"--owner-pid\0{owner.pid}\0".encode(), "cmdline")
    assert replacement != worker and f"PYTHONPATH={app}".encode() in Path(f"/proc/{replacement}/environ").read_bytes()
