"""Faults on a real local federation: a node that dies mid-round and comes back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import tomllib
from pathlib import Path

from test_local import ZK0, write_env


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def supernode_pid(port: int, name: str) -> int | None:
    """The pid of this test's SuperNode called `name` (matched on the SuperLink port it uses)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(args).decode(errors="replace")
        if "flower-supernode" in text and f"127.0.0.1:{port}" in text and f'name="{name}"' in text:
            return int(proc.name)
    return None


def test_killed_node_is_left_out_then_rejoins(demo, tmp_path):
    out = tmp_path / "out"
    env_file = write_env(tmp_path / "faults.env", demo, out, ZK0_MIN_NODES=3, ZK0_LOCAL_STEPS=20)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    run = subprocess.Popen([*ZK0, "local", "--env-file", str(env_file)], env=env,
                           stdout=open(tmp_path / "zk0.log", "wb"), stderr=subprocess.STDOUT)
    restarted = None
    try:
        log = out / "local" / "logs" / "supernode-2.log"
        wait_until(lambda: log.exists() and "step 5/20" in log.read_text(), 600, "node-2 training round 1")
        config = tomllib.loads((out / "local" / "flwr-home" / "config.toml").read_text())
        port = int(config["superlink"]["local"]["address"].rsplit(":", 1)[1])
        pid = supernode_pid(port, "node-2")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        node_env = dict(line.split(b"=", 1) for line in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in line)
        os.killpg(pid, signal.SIGKILL)  # the robot host loses power: the node and its app process
        # The host comes back and starts the same SuperNode again.
        restarted = subprocess.Popen(cmdline, env=node_env, start_new_session=True,
                                     stdout=open(tmp_path / "node-2-again.log", "wb"), stderr=subprocess.STDOUT)
        assert run.wait(timeout=900) == 0, (tmp_path / "zk0.log").read_text()[-3000:]
    finally:
        for proc in (run, restarted):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL) if proc is restarted else proc.kill()
    history = json.loads((out / "history.json").read_text())
    names = {r["round"]: sorted(c["name"] for c in r["clients"].values() if "train" in c) for r in history}
    assert len(history[1]["contributors"]) == 3 and "node-2" not in names[1]
    for r in (2, 3):
        assert len(history[r]["contributors"]) == 4 and names[r] == [f"node-{i}" for i in range(4)]
    assert (out / "checkpoints" / "round-003" / "model.safetensors").is_file()
