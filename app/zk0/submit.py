"""`zk0 submit`: send one experiment to a running SuperLink, stream its log, wait for its end.

This is what the Compose `submit` service runs; it works the same against any SuperLink, e.g. on a
workstation whose SuperLink, SuperNodes and ServerApp were started by hand.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

from .local import _absolute_paths, load_env_file, preflight, settings_from_env
from .procs import die_with_parent
from .settings import ServerSettings, SettingsError
from .supernode import wait_reachable

log = logging.getLogger("zk0")
# A SuperLink that keeps failing runs is not a blip to ride out.
MAX_RESUBMITS = 3
# The Flower App that `flwr run` packages: the source checkout next to this package, or the copy
# the Docker image keeps (an installed package has no pyproject.toml beside it).
APP_DIRS = (Path(__file__).resolve().parents[1], Path("/opt/zk0-src/app"))


def find_app_dir(given: Path | None) -> Path:
    """The app directory to submit: the one given, else the first known one holding pyproject.toml."""
    for candidate in [given] if given else APP_DIRS:
        if (candidate / "pyproject.toml").is_file():
            return candidate.resolve()
    where = given or " or ".join(map(str, APP_DIRS))
    raise SettingsError(f"no Flower App at {where} (no pyproject.toml); pass --app DIR, the folder holding app/pyproject.toml")


def write_connection(flwr_home: Path, address: str, root_certificates: Path | None) -> str:
    """A `[superlink.zk0]` connection in $FLWR_HOME/config.toml; returns its name."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    conn: dict = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(root_certificates.resolve())
    (flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "zk0", "zk0": conn}}))
    return "zk0"


class Flwr:
    """The `flwr` CLI with this submission's FLWR_HOME; each command dies with `zk0 submit` (a killed
    submission leaves no log stream behind)."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        candidate = Path(sys.executable).parent / "flwr"
        self.exe = str(candidate) if candidate.exists() else "flwr"

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([self.exe, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=die_with_parent())

    def stream(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([self.exe, *args], env=self.env, preexec_fn=die_with_parent())


def run_status(flwr: Flwr, run_id: str, conn: str) -> str:
    """The run's status from `flwr ls` ('' when the SuperLink cannot be asked right now)."""
    try:
        res = flwr("ls", conn, "--run-id", run_id, "--format", "json", timeout=60)
    except subprocess.TimeoutExpired:
        return ""
    if res.returncode != 0:
        return ""
    try:
        runs = json.loads(res.stdout).get("runs", [])
    except ValueError:
        return ""
    return str(runs[0].get("status", "")) if runs else ""


def submit_and_wait(
    address: str,
    env_file: Path | None = None,
    app_dir: Path | None = None,
    root_certificates: Path | None = None,
    tries: int = 30,
    wait: float = 2.0,
    poll: float = 3.0,
) -> int:
    """Submit the experiment described by the environment (and env-file); 0 when it completed."""
    env = load_env_file(env_file)
    settings = _absolute_paths(settings_from_env(ServerSettings, env))
    preflight(settings, [])
    app = find_app_dir(app_dir)
    if root_certificates is not None and not root_certificates.is_file():
        raise SettingsError(f"--root-certificates {root_certificates} does not exist")
    wait_reachable(address, tries, wait)
    if root_certificates is None:
        log.warning("connecting to SuperLink %s without TLS: use --root-certificates across networks", address)

    with tempfile.TemporaryDirectory(prefix="zk0-submit-") as tmp:
        flwr_home = Path(env.get("FLWR_HOME") or Path(tmp) / "flwr-home")
        flwr = Flwr({**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0"})
        conn = write_connection(flwr_home, address, root_certificates)
        run_config = Path(tmp) / "run-config.toml"
        run_config.write_text(tomli_w.dumps(settings.to_flower_config()))
        started = time.monotonic()
        run_id = submit_run(flwr, app, conn, run_config)
        log.info("run %s submitted to %s; outputs in %s (on the ServerApp's host)", run_id, address, settings.output_dir)
        for resubmits in range(MAX_RESUBMITS + 1):
            status, lost = follow(flwr, run_id, conn, poll)
            # A SuperLink restart fails the running run (Flower 1.42); its database keeps the nodes,
            # and a new run's ServerApp resumes from the newest checkpoint: submit again.
            if not (status == "finished:failed" and lost) or resubmits == MAX_RESUBMITS:
                break
            log.warning("run %s failed while the SuperLink was away; submitting again to resume from the newest checkpoint", run_id)
            wait_reachable(address, tries, wait)
            run_id = submit_run(flwr, app, conn, run_config)
    log.info("run %s: %s after %.0fs", run_id, status, time.monotonic() - started)
    return 0 if status == "finished:completed" else 1


def submit_run(flwr: Flwr, app: Path, conn: str, run_config: Path) -> str:
    """`flwr run` the app with the run config; the new run's id."""
    res = flwr("run", str(app), conn, "--run-config", str(run_config), "--format", "json", timeout=600)
    try:
        return str(json.loads(res.stdout)["run-id"])
    except (ValueError, KeyError):
        raise RuntimeError(f"flwr run failed (exit {res.returncode}): {res.stdout}\n{res.stderr}") from None


def follow(flwr: Flwr, run_id: str, conn: str, poll: float) -> tuple[str, bool]:
    """Stream the run's log until it finishes; (final status, whether the SuperLink was ever unreachable)."""
    lost = False
    streamer = flwr.stream("log", run_id, conn, "--stream")
    try:
        while not (status := run_status(flwr, run_id, conn)).startswith("finished"):
            lost |= status == ""
            if streamer.poll() is not None:  # the stream ends when the SuperLink goes away; reattach
                streamer = flwr.stream("log", run_id, conn, "--stream")
            time.sleep(poll)
    finally:
        time.sleep(1)  # let the last lines arrive
        streamer.terminate()
        streamer.wait(timeout=10)
    return status, lost
