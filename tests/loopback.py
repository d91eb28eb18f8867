"""Real Flower processes on loopback for tests that need a SuperLink but not zk0's training: a
SuperLink that can be killed and started again, and a stub Flower App whose ServerApp does nothing
but report its run config and finish (or fail) when the test says so."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import tomli_w

from zk0.deploy.local import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)
    return result


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def pids_with(needle: bytes, where: str = "environ") -> list[int]:
    """Live processes whose environment (or command line) holds `needle`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / where).read_bytes() and alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class SuperLink:
    """flower-superlink on loopback with its state in a database; `kill` and `start` again as a host
    going down and coming back. Leaving the block ends it and every process started below it."""

    def __init__(self, workdir: Path, tls: Path | None = None, **env: str):
        self.workdir, self.tls, self.port, self.proc = workdir, tls, free_port(), None
        self.mark = f"CLAIMS_TEST_SUPERLINK={uuid.uuid4().hex}"
        self.env = {**os.environ, **env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(workdir / "superlink-home"),
                    self.mark.split("=")[0]: self.mark.split("=")[1]}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        security = ["--insecure"] if self.tls is None else [
            "--ssl-ca-certfile", str(self.tls / "ca.crt"), "--ssl-certfile", str(self.tls / "superlink.crt"),
            "--ssl-keyfile", str(self.tls / "superlink.key"), "--enable-supernode-auth"]
        log = open(self.workdir / "superlink.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [str(BIN / "flower-superlink"), *security, "--host", "127.0.0.1", "--port", str(self.port),
             "--disable-runtime-dependency-installation", "--database", str(self.workdir / "superlink.db")],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

        def listening() -> bool:
            assert self.proc.poll() is None, (self.workdir / "superlink.log").read_text()[-3000:]
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, 300, "the SuperLink to listen")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=60)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        # The SuperExec and the ServerApp run in sessions of their own: find them by the mark they inherited.
        for pid in pids_with(self.mark.encode()):
            os.kill(pid, signal.SIGKILL)


STUB_SERVERAPP = '''
"""A ServerApp that records its run config, says it started, then waits to be released (a run that
lasts as long as the test wants) and fails if the test asked for that."""
import json
import os
import time
from pathlib import Path

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

app = ServerApp()
client = ClientApp()


@app.main()
def main(grid, context):
    state = Path(os.environ["STUB_STATE"])
    (state / f"config-{context.run_id}.json").write_text(json.dumps(dict(context.run_config)))
    (state / f"started-{context.run_id}").touch()
    while not (state / "release").exists():
        time.sleep(0.2)
    if (state / "fail").exists():
        raise RuntimeError("the test asked this run to fail")
'''


def stub_app(directory: Path) -> Path:
    """A Flower App that takes zk0's run config (the same keys) and runs STUB_SERVERAPP."""
    config = tomllib.loads((ROOT / "app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "stubapp", "version": "1.0.0", "description": "zk0 test stand-in", "license": "Apache-2.0",
                    "dependencies": []},
        "tool": {"hatch": {"build": {"targets": {"wheel": {"packages": ["stubapp"]}}}},
                 "flwr": {"app": {"publisher": "zk0test", "components": {"serverapp": "stubapp.server:app",
                                                                          "clientapp": "stubapp.server:client"},
                                  "config": config}}},
    }
    (directory / "stubapp").mkdir(parents=True)
    (directory / "pyproject.toml").write_text(tomli_w.dumps(project))
    (directory / "stubapp" / "__init__.py").write_text("")
    (directory / "stubapp" / "server.py").write_text(STUB_SERVERAPP)
    return directory


def started_runs(state: Path) -> list[str]:
    """The run ids whose stub ServerApp has started, in id order."""
    return sorted(p.name.removeprefix("started-") for p in state.glob("started-*"))


class StubFederation(SuperLink):
    """A SuperLink whose runs are the stub app's: `state` is where its ServerApps report, `app` the
    Flower App to submit; `release(fail=...)` lets every waiting and later run finish."""

    def __init__(self, workdir: Path):
        self.state = workdir / "state"
        self.state.mkdir(parents=True, exist_ok=True)
        # The SuperExec looks for new runs every second by default; a quarter second shortens each run.
        super().__init__(workdir, STUB_STATE=str(self.state), FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.25")
        self.app = stub_app(workdir / "app")

    def release(self, fail: bool = False) -> None:
        (self.state / "fail").unlink(missing_ok=True)
        if fail:
            (self.state / "fail").touch()
        (self.state / "release").touch()

    def hold(self) -> None:
        """Later runs wait until the next release()."""
        (self.state / "release").unlink(missing_ok=True)

    def config(self, run_id: str) -> dict:
        """The run config the run's ServerApp received."""
        import json

        return json.loads((self.state / f"config-{run_id}.json").read_text())
