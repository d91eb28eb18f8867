"""`zk0 supernode` watches its own SuperNode: a ClientApp that never starts is reported, then the node is stopped."""

from __future__ import annotations

import os
import re
import time
import tomllib

from federation import ZK0, marked_processes, write_env
from test_supernode import free_port, popen_logged, supernode

# Installed as sitecustomize for a joined node: each of its flwr-clientapp processes dies before it checks
# in with the SuperNode, as on a robot host whose Python environment is broken. The SuperNode and its
# SuperExec are Flower's own and untouched; only the ClientApp's import of Flower's entry point fails.
BROKEN_CLIENTAPP = """
import sys
if sys.argv and sys.argv[0].endswith("flwr-clientapp"):
    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name == "flwr.supernode.cli":
                raise ModuleNotFoundError("No module named 'flwr.supernode.cli' (made to fail by the test)")
    sys.meta_path.insert(0, Broken())
"""


def test_a_joined_node_whose_clientapp_never_starts_is_reported_then_stopped(demo, tmp_path):
    """`zk0 supernode` reports a ClientApp that never starts as `zk0 local` does, gives up at its bound and exits 4."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(BROKEN_CLIENTAPP)
    out = tmp_path / "out"
    # One node of zk0 local's own and ZK0_MIN_NODES=2: the run waits for the joined node and sends it work.
    env_file = write_env(tmp_path / "one.env", demo, out, nodes=1, ZK0_NUM_ROUNDS=1, ZK0_LOCAL_STEPS=2,
                         ZK0_MIN_NODES=2, ZK0_EVAL_BATCHES=1, WANDB_MODE="disabled")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    run = popen_logged([*ZK0, "local", "--env-file", str(env_file)], tmp_path / "zk0.log", env=env)
    mark = f"test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        config_file = out / "local" / "flwr-home" / "config.toml"
        deadline = time.monotonic() + 300
        while not config_file.exists() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.5)
        address = tomllib.loads(config_file.read_text())["superlink"]["local"]["address"]
        pythonpath = os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))
        code, output = supernode("--superlink", address, "--port", str(free_port()), "--give-up-after", "20",
                                 timeout=600, ZK0_DATASET=demo["datasets"]["node-1"],
                                 ZK0_CAMERAS=demo["cameras"]["node-1"], ZK0_NAME="robot-1", PYTHONPATH=pythonpath,
                                 TEST_NODE_MARK=mark)
        left = marked_processes("TEST_NODE_MARK", mark)
        for _ in range(50):  # the guard ends what the SuperNode started, within its grace
            if not (left := marked_processes("TEST_NODE_MARK", mark)):
                break
            time.sleep(0.2)
    finally:
        run.terminate()
        run.wait(timeout=120)
    assert code == 4, output[-3000:]
    reports = re.findall(r"zk0 WARNING: robot-1 \(SuperNode \d+\): ClientApp for its (\w+) message failed to start "
                         r"\((\d+) s after the message arrived\): (.*)$", output, re.M)
    assert reports and "No module named 'flwr.supernode.cli' (made to fail by the test)" in reports[0][2], output
    (give_up,) = re.findall(r"zk0 ERROR: robot-1 \(SuperNode \d+\): giving up: its ClientApp has failed to start for "
                            r"(\d+) s since its (\w+) message arrived \((.*)\)\. Stopping this SuperNode", output, re.M)
    assert 20 <= int(give_up[0]) <= 20 + 2 * 2 + 1 and give_up[1] == reports[0][0]
    assert "made to fail by the test" in give_up[2] and "start zk0 supernode again" in output
    assert not left, left
