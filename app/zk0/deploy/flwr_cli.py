"""The `flwr` CLI as `zk0 local` and `zk0 submit` drive it: the connection file, `flwr run`, run status,
log following, and the one retry policy for a SuperLink that goes away mid-run."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import tomli_w

from .procs import die_with_parent

log = logging.getLogger("zk0")
# A SuperLink that keeps going away is not a blip to ride out: at most this many losses per experiment
# are (each a resubmission, and for `zk0 local` a restart of its own SuperLink).
MAX_RETRIES = 3
# Flower's programs call home unless told not to: usage telemetry, and (1.42) an update check that asks
# api.flower.ai from every start of flwr, flower-superlink, flower-supernode and flower-superexec.
# zk0 runs where there is no Internet (and must not try): every Flower process zk0 starts gets these.
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
# What a `watch` hook of see_run_through returns when the SuperLink went away and is back.
LOST = "lost"


def bin_path(name: str) -> str:
    """A console script next to this interpreter (flwr, flower-superlink, ...), whatever PATH says."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def write_connection(flwr_home: Path, address: str, root_certificates: Path | None = None, name: str = "zk0") -> str:
    """Flower 1.42 keeps SuperLink connections in $FLWR_HOME/config.toml: write one as the default; its name."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    if root_certificates is None:
        security = {"insecure": True}
    else:
        security = {"root-certificates": str(root_certificates.resolve())}
    config = {"superlink": {"default": name, name: {"address": address, **security}}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))
    return name


class Flwr:
    """The `flwr` CLI with one FLWR_HOME and connection. Each command dies with the zk0 process that ran
    it, so a killed `zk0 local` or `zk0 submit` leaves no log stream behind."""

    def __init__(self, env: dict[str, str], connection: str):
        self.env, self.connection, self.exe = env, connection, bin_path("flwr")

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([self.exe, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=die_with_parent())

    def submit(self, app: Path, run_config: Path, *extra: str) -> str:
        """`flwr run` the app with the run config (TOML file); the new run's id."""
        res = self("run", str(app), self.connection, "--run-config", str(run_config), *extra, "--format", "json",
                   timeout=600)
        try:
            return str(json.loads(res.stdout)["run-id"])
        except (ValueError, KeyError):
            raise RuntimeError(f"flwr run failed (exit {res.returncode}): {res.stdout}\n{res.stderr}") from None

    def stream(self, run_id: str) -> subprocess.Popen:
        """`flwr log --stream` of the run, printed to this process's output."""
        return subprocess.Popen([self.exe, "log", run_id, self.connection, "--stream"], env=self.env,
                                preexec_fn=die_with_parent())


def run_status(flwr: Flwr, run_id: str) -> str:
    """The run's status from `flwr ls` ('' while the SuperLink cannot be asked)."""
    try:
        res = flwr("ls", flwr.connection, "--run-id", run_id, "--format", "json", timeout=60)
    except subprocess.TimeoutExpired:
        return ""
    if res.returncode != 0:
        return ""
    try:
        runs = json.loads(res.stdout).get("runs", [])
    except ValueError:
        return ""
    return str(runs[0].get("status", "")) if runs else ""


class LogStream:
    """The current run's log stream: moved to each new run, reattached once the SuperLink is back."""

    def __init__(self, flwr: Flwr):
        self.flwr, self.proc, self.broken = flwr, None, False

    def follow(self, run_id: str) -> None:
        self.close(grace=0)
        self.run_id, self.broken, self.proc = run_id, False, self.flwr.stream(run_id)

    def revive(self) -> None:
        """Start the stream again if it ended because the SuperLink went away (not because the run did)."""
        if self.broken and self.proc is not None and self.proc.poll() is not None:
            self.follow(self.run_id)

    def close(self, grace: float = 1.0) -> None:
        """End the stream, after up to `grace` seconds for its last lines (it ends by itself with its run)."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                self.proc.wait(timeout=10)
            self.proc = None


def see_run_through(
    flwr: Flwr, submit: Callable[[], str], poll: float, watch: Callable[[], str | None] = lambda: None
) -> tuple[str, str]:
    """Submit a run and follow its log to a final status; return (run id, status).

    Flower 1.42 fails the running run when its SuperLink goes away (the ServerApp dies with it), while
    SuperNodes reconnect by themselves. So a run that failed after the SuperLink was unreachable is
    submitted again, at most MAX_RETRIES times: its ServerApp resumes from the newest checkpoint.
    `watch`, called before each poll, lets `zk0 local` restart its own SuperLink: it returns LOST when it
    did, a final status to stop waiting, or None.
    """
    run_id, lost, retries = submit(), False, 0
    stream = LogStream(flwr)
    stream.follow(run_id)
    try:
        while True:
            seen = watch()
            if seen not in (None, LOST):
                return run_id, seen
            status = run_status(flwr, run_id)
            lost |= seen == LOST or status == ""
            stream.broken |= lost
            if status == "finished:failed" and lost and retries < MAX_RETRIES:
                log.warning("run %s failed while the SuperLink was away; submitting again to resume from the "
                            "newest checkpoint", run_id)
                run_id, lost, retries = submit(), False, retries + 1
                stream.follow(run_id)
            elif status.startswith("finished"):
                return run_id, status
            stream.revive()
            time.sleep(poll)
    finally:
        stream.close()
