"""`zk0 supernode` and `zk0 local --tls`: checks before joining, TLS, SuperNode authentication."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from federation import ZK0, write_env

from zk0.deploy.supernode import supernode_command
from zk0.settings import NodeSettings

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def supernode(*args: str, timeout: float = 120, **env: str) -> tuple[int, str]:
    """Run `zk0 supernode`; (exit code, output)."""
    # Output goes to a file, not a pipe: flower-supernode's SuperExec child outlives it briefly and
    # would hold a pipe open while its parent, unreaped until the pipe closes, still looks alive.
    with tempfile.TemporaryFile() as output:
        code = subprocess.run([*ZK0, "supernode", *args], env={**os.environ, **{k: str(v) for k, v in env.items()}},
                              stdout=output, stderr=subprocess.STDOUT, timeout=timeout).returncode
        output.seek(0)
        return code, output.read().decode(errors="replace")


def popen_logged(cmd: list[str], log_path: Path, **kwargs) -> subprocess.Popen:
    """Start `cmd` with stdout and stderr to `log_path` (the child keeps its own copy of the file)."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kwargs)


def test_unreachable_superlink_is_named_within_bounded_time(demo):
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    code, output = supernode("--superlink", address, "--connect-tries", "3", "--connect-wait", "0.5",
                             ZK0_DATASET=demo["datasets"]["node-0"], ZK0_CAMERAS=demo["cameras"]["node-0"])
    assert code == 3
    assert f"SuperLink {address} is not reachable after 3 tries" in output and "firewalls" in output
    assert time.monotonic() - started < 60


def test_bad_node_settings_fail_before_any_connection(demo):
    code, output = supernode("--superlink", f"127.0.0.1:{free_port()}", ZK0_DATASET="/nonexistent/so100")
    assert code == 2 and "/nonexistent/so100" in output and "not reachable" not in output
    code, output = supernode("--superlink", "127.0.0.1:1", ZK0_DATASET=demo["datasets"]["node-0"],
                             ZK0_HELDOUT_EPISODES="-1")
    assert code == 2 and "ZK0_HELDOUT_EPISODES" in output
    # A dataset whose cameras are not the policy's: the table, the cameras, the line to paste; no connection tried.
    code, output = supernode("--superlink", f"127.0.0.1:{free_port()}", ZK0_DATASET=demo["datasets"]["node-1"])
    assert code == 2 and "not reachable" not in output, output
    assert "dataset cameras: laptop, phone" in output and "ZK0_CAMERAS=laptop=camera1,phone=camera2" in output


def make_certs(directory: Path, nodes: int) -> Path:
    subprocess.run([str(ROOT / "superlink" / "make-certs.sh"), "-n", str(nodes), str(directory)], check=True,
                   timeout=120)
    return directory


def test_make_certs_names_the_superlink_and_makes_node_keys(tmp_path):
    certs = make_certs(tmp_path / "certs", 1)
    subprocess.run([str(ROOT / "superlink" / "make-certs.sh"), str(certs), "superlink.lab.example", "10.0.0.7"],
                   check=True)
    text = subprocess.run(["openssl", "x509", "-in", str(certs / "superlink.crt"), "-noout", "-ext", "subjectAltName"],
                          capture_output=True, text=True, check=True).stdout
    for san in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:superlink.lab.example", "IP Address:10.0.0.7"):
        assert san in text
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / "superlink.crt")],
                            capture_output=True, text=True)
    assert verify.returncode == 0
    assert (certs / "supernodes" / "node-0.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert "OPENSSH PRIVATE KEY" in (certs / "supernodes" / "node-0").read_text()


def _unregistered_and_plaintext_are_refused(tls: list[str], certs: Path, node: dict, env: dict, tmp_path: Path):
    """A key the SuperLink does not know, and a plaintext client, are both refused by the TLS SuperLink."""
    # A key the SuperLink does not know is refused (Flower's exit code 305).
    code, output = supernode(*tls, "--auth-key", str(certs / "supernodes" / "node-3"), "--port", str(free_port()),
                             **node)
    assert code != 0 and "Exit Code: 305" in output and "Failed to activate SuperNode" in output
    # A plaintext client is refused by the TLS SuperLink.
    plain, address = tmp_path / "plain.log", tls[tls.index("--superlink") + 1]
    with open(plain, "wb") as log:
        code = subprocess.run(
            [str(Path(sys.executable).parent / "flower-supernode"), "--insecure", "--superlink", address,
             "--max-retries", "2", "--port", str(free_port())],
            stdout=log, stderr=subprocess.STDOUT, timeout=120,
            env={**env, "FLWR_TELEMETRY_ENABLED": "0", "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
        ).returncode
    assert code != 0 and "Exit Code: 305" in plain.read_text()


def test_tls_federation_admits_registered_nodes_only(demo, tmp_path):
    certs = make_certs(tmp_path / "certs", 4)  # node-0, node-1 for zk0 local, node-2 joins, node-3 never registered
    out = tmp_path / "out"
    env_file = write_env(tmp_path / "tls.env", demo, out, nodes=2, ZK0_NUM_ROUNDS=1, ZK0_LOCAL_STEPS=4,
                         ZK0_MIN_NODES=3, ZK0_EVAL_BATCHES=1, WANDB_MODE="disabled")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    run = popen_logged([*ZK0, "local", "--env-file", str(env_file), "--tls", str(certs)], tmp_path / "zk0.log",
                       env=env)
    joined = None
    try:
        config_file = out / "local" / "flwr-home" / "config.toml"
        node_log = out / "local" / "logs" / "supernode-1.log"
        deadline = time.monotonic() + 300
        while not node_log.exists() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.5)
        connection = tomllib.loads(config_file.read_text())["superlink"]["local"]
        address = connection["address"]
        assert connection["root-certificates"] == str(certs / "ca.crt")
        node = {"ZK0_DATASET": demo["datasets"]["node-2"], "ZK0_CAMERAS": demo["cameras"]["node-2"],
                "ZK0_NAME": "robot-2", "ZK0_HELDOUT_EPISODES": "2"}
        tls = ["--superlink", address, "--root-certificates", str(certs / "ca.crt")]
        _unregistered_and_plaintext_are_refused(tls, certs, node, env, tmp_path)
        # A registered key joins through `zk0 supernode`, and the round waits for it (min 3 nodes).
        flwr_env = {**env, "FLWR_HOME": str(config_file.parent), "FLWR_TELEMETRY_ENABLED": "0"}
        subprocess.run([str(Path(sys.executable).parent / "flwr"), "supernode", "register",
                        str(certs / "supernodes" / "node-2.pub"), "local"], env=flwr_env, check=True, timeout=120)
        joined = popen_logged(
            [*ZK0, "supernode", *tls, "--auth-key", str(certs / "supernodes" / "node-2"), "--port", str(free_port())],
            tmp_path / "joined.log", env={**env, **node}, start_new_session=True,
        )
        assert run.wait(timeout=900) == 0, (tmp_path / "zk0.log").read_text()[-3000:]
    finally:
        for proc in (run, joined):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, 9) if proc is joined else proc.kill()
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1]
    names = sorted(c["name"] for c in history[1]["clients"].values() if "train" in c)
    assert names == ["node-0", "node-1", "robot-2"] and len(history[1]["contributors"]) == 3


def test_with_index_a_node_reads_its_own_variables_of_an_experiment(demo, tmp_path):
    """`zk0 supernode --index N` (what each Compose SuperNode runs) takes ZK0_NODE_<N>_* and names them."""
    env_file = write_env(tmp_path / "experiment.env", demo, tmp_path / "out")
    text = env_file.read_text().replace(f"ZK0_NODE_1_CAMERAS={demo['cameras']['node-1']}\n", "")
    env_file.write_text(text)
    code, output = supernode("--index", "1", "--env-file", str(env_file), "--superlink", f"127.0.0.1:{free_port()}")
    assert code == 2 and "this SuperNode cannot start" in output and "not reachable" not in output, output
    assert "node-1 (ZK0_NODE_1_DATASET=" in output and "ZK0_NODE_1_CAMERAS=laptop=camera1,phone=camera2" in output
    address = f"127.0.0.1:{free_port()}"  # node 2's settings pass: only the SuperLink is missing
    code, output = supernode("--index", "2", "--env-file", str(env_file), "--superlink", address,
                             "--connect-tries", "1")
    assert code == 3 and f"SuperLink {address} is not reachable" in output, output


def test_a_nodes_own_variables_outrank_the_ones_every_node_gets(monkeypatch):
    """compose.cpu.yaml gives every node ZK0_DEVICE=cpu; a node's ZK0_NODE_<i>_DEVICE still wins."""
    from zk0.deploy.preflight import node_settings_from_env

    monkeypatch.setenv("ZK0_DEVICE", "cpu")
    # Empty means unset, as Compose passes every node's `${ZK0_NODE_<i>_NAME:-}` to every node.
    env = {"ZK0_NODE_1_DATASET": "lab/a", "ZK0_NODE_1_DEVICE": "cuda:1", "ZK0_NODE_2_DATASET": "lab/b",
           "ZK0_NODE_2_DEVICE": "", "ZK0_NODE_2_NAME": ""}
    (one,), _, _ = node_settings_from_env(env, 1)
    (two,), _, _ = node_settings_from_env(env, 2)
    assert (one.device, one.name, two.device, two.name) == ("cuda:1", "node-1", "cpu", "node-2")
    nodes, _, problems = node_settings_from_env({**env, "ZK0_NODE_2_HELDOUT_EPISODES": "-1"}, 2)
    assert not nodes and "ZK0_NODE_2_HELDOUT_EPISODES (" in problems[0]
    (missing,) = node_settings_from_env(env, 3)[2]  # no node 3 at all: its dataset variable is named
    assert missing.startswith("node 3:") and "ZK0_NODE_3_DATASET (" in missing


def test_node_loop_caps_flowers_waits_starts_zk0s_superexec_and_changes_nothing_in_another_flower(monkeypatch, caplog):
    from flwr.supernode import start_client_internal as loop

    from zk0.deploy import node_loop

    monkeypatch.setattr(loop, "time", time)  # undone after the test: this process runs no SuperNode
    monkeypatch.setattr(loop, "subprocess", subprocess)
    monkeypatch.setattr(node_loop, "IDLE_WAIT", "time.sleep(30)")  # a loop without the line it shortens
    assert not node_loop.shorten_waits() and loop.time is time
    assert "SuperNode: Flower's own loop, unchanged" in caplog.text and "time.sleep(30)" in caplog.text
    monkeypatch.setattr(node_loop, "IDLE_WAIT", "time.sleep(3)")
    assert node_loop.shorten_waits(0.05) and loop.time is not time
    started = time.monotonic()
    loop.time.sleep(3)  # Flower's idle wait, as its loop calls it
    assert time.monotonic() - started < 1 and loop.time.monotonic is time.monotonic
    superexec = loop.subprocess.Popen(["flower-superexec", "--help"], stdout=subprocess.PIPE, text=True)
    assert "zk0.deploy.exec_loop" in " ".join(superexec.args) and "--runtime-api-address" in superexec.communicate()[0]


def test_node_loop_runs_flowers_own_loop_when_it_cannot_import_it(monkeypatch, caplog):
    import flwr.supernode
    from flwr.supernode import start_client_internal as loop

    from zk0.deploy import node_loop

    monkeypatch.setattr(loop, "time", time)
    monkeypatch.setattr(loop, "subprocess", subprocess)
    monkeypatch.delattr(flwr.supernode, "start_client_internal")  # as if a later Flower moved the module
    monkeypatch.setitem(sys.modules, "flwr.supernode.start_client_internal", None)
    assert not node_loop.shorten_waits() and loop.time is time and loop.subprocess is subprocess
    assert "SuperNode: Flower's own loop, unchanged" in caplog.text and "cannot be imported" in caplog.text


def test_zk0_supernode_runs_flowers_own_program_unless_asked_for_the_fast_loop():
    node = NodeSettings(dataset="/data/so100")
    stock = supernode_command("127.0.0.1:9092", node)
    assert Path(stock[0]).name == "flower-supernode" and "--insecure" in stock and "zk0" not in " ".join(stock[:2])
    fast = supernode_command("127.0.0.1:9092", node, fast_loop=True)
    assert fast[:3] == [sys.executable, "-m", "zk0.deploy.node_loop"] and fast[3:] == stock[1:]


def test_no_flower_process_zk0_starts_calls_home(tmp_path):
    """Flower 1.42 asks api.flower.ai for updates from every program's start unless told not to."""
    import threading

    from flwr.supercore.update_check import warn_if_flwr_update_available

    from zk0.deploy.flwr_cli import QUIET
    from zk0.deploy.local import _process_env

    env = _process_env({"PATH": "/usr/bin"}, tmp_path)
    assert {k: env[k] for k in QUIET} == QUIET == {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert all(f"{k}={v}" in dockerfile for k, v in QUIET.items())
    assert os.environ["FLWR_DISABLE_UPDATE_CHECK"] == "1"  # conftest: the suite's own Flower processes too
    before = set(threading.enumerate())
    warn_if_flwr_update_available(process_name="flower-supernode")  # Flower's own check, under that setting
    assert set(threading.enumerate()) == before  # no thread went to ask


def test_fork_server_runs_flowers_clientapp_once_per_request_and_ends_with_its_input():
    from zk0.deploy.fork_executor import FORK_SERVER

    server = subprocess.Popen([sys.executable, "-P", str(FORK_SERVER)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    requests = [{"args": ["--help"], "quiet": False}, {"args": ["--help"], "quiet": True}]
    # Output ends once the server and every child it forked have ended: the server ends with its input.
    out = server.communicate("".join(json.dumps(r) + "\n" for r in requests), timeout=120)[0]
    assert server.returncode == 0, out
    assert out.count("usage: flwr-clientapp") == 1 and "--token" in out, out  # Flower's own parser; quiet is quiet

