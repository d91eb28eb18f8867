"""The fast loop's SuperExec: Flower's own command for every ClientApp, and Flower's own SuperExec where it fails."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import factory, subprocess_executor
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec

from zk0.deploy import exec_loop, fork_executor
from zk0.deploy.proc_table import process_table

SPEC = ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9094", token="t0k3n",
                     insecure=True, root_certificates_path=None, runtime_dependency_install=False,
                     parent_pid=4242, suppress_output=False, task_id=7)

# Makes every import of FLOWER_MODULE fail while zk0's executor module is being imported, as a Flower
# that moved a private module would; Flower's own imports of it still work.
BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        frame = sys._getframe(1)
        while frame is not None:
            if name == {module!r} and frame.f_globals.get("__name__") == "zk0.deploy.fork_executor":
                raise ImportError("No module named " + repr(name) + " (blocked by the test)")
            frame = frame.f_back
        return None
sys.meta_path.insert(0, Block())
from zk0.deploy.exec_loop import main
main()
"""
FLOWER_MODULE = "flwr.supercore.superexec.executor.subprocess_executor"


def flowers_command(spec: ExecutionSpec, monkeypatch) -> list[str]:
    """What Flower's own SubprocessExecutor.launch starts for `spec` (its Popen recorded, nothing started)."""
    started = []

    class Recorder:
        DEVNULL = subprocess.DEVNULL

        @staticmethod
        def Popen(args, **options):  # noqa: N802 (subprocess's name)
            started.append(list(args))

    with monkeypatch.context() as patch:
        patch.setattr(subprocess_executor, "subprocess", Recorder)
        SubprocessExecutor().launch(spec)
    (command,) = started
    return command


@pytest.mark.parametrize("change", [
    {}, {"parent_pid": None}, {"insecure": False, "root_certificates_path": "/tls/ca.crt"},
    {"insecure": False}, {"suppress_output": True}, {"runtime_api_address": "[::1]:9095", "token": "other"},
])
def test_zk0s_clientapp_command_is_flowers_own(change, monkeypatch):
    spec = dataclasses.replace(SPEC, **change)
    assert ["flwr-clientapp", *fork_executor.clientapp_args(spec)] == flowers_command(spec, monkeypatch)
    assert fork_executor.seam_problem() is None  # the Flower installed here is the one the copy was made from


def test_another_flowers_executor_gets_flowers_own_superexec_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(factory, "SubprocessExecutor", SubprocessExecutor)  # undone after the test
    monkeypatch.setattr(fork_executor, "LAUNCH_DIGEST", "0" * 16)  # as if Flower's launch had changed
    assert not exec_loop.forked_clientapps() and factory.SubprocessExecutor is SubprocessExecutor
    assert "SuperExec: Flower's own" in caplog.text and "SubprocessExecutor.launch is not flwr 1.42.0's" in caplog.text
    monkeypatch.undo()
    monkeypatch.setattr(factory, "SubprocessExecutor", SubprocessExecutor)
    assert exec_loop.forked_clientapps() and factory.SubprocessExecutor is fork_executor.ForkingExecutor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_superexec(module: str, tmp_path: Path) -> tuple[str, str]:
    """Start exec_loop with `module` blocked for zk0's executor until its health server answers;
    (its log, the command lines of its children)."""
    health = free_port()
    args = ["--runtime-api-address", f"127.0.0.1:{free_port()}", "--insecure",
            "--health-server-address", f"127.0.0.1:{health}"]
    log = tmp_path / f"superexec-{module}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", BLOCK.format(module=module), *args],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline, serving = time.monotonic() + 120, False
        while not serving and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            with socket.socket() as s:
                serving = s.connect_ex(("127.0.0.1", health)) == 0
        assert serving, log.read_text()[-3000:]
        children = {Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                    for pid, p in process_table().items() if p.ppid == proc.pid}
    finally:
        proc.kill()
        proc.wait()
    return log.read_text(), " ".join(children)


def test_a_private_import_that_fails_leaves_flowers_own_superexec_serving(tmp_path):
    text, children = run_superexec(FLOWER_MODULE, tmp_path)
    assert "SuperExec: Flower's own" in text and f"ImportError: No module named {FLOWER_MODULE!r}" in text, text
    assert "Starting Flower SuperExec" in text and "app_forks.py" not in children
    # The same start with nothing blocked: zk0's SuperExec, with its fork server.
    text, children = run_superexec("no.such.module", tmp_path)
    assert "SuperExec: zk0's" in text and "Starting Flower SuperExec" in text and "app_forks.py" in children, text
