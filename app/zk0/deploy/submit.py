"""`zk0 submit`: send one experiment to a running SuperLink, stream its log, wait for its end.

This is what the Compose `submit` service runs; it works the same against any SuperLink, e.g. on a
workstation whose SuperLink, SuperNodes and ServerApp were started by hand.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import tomli_w

from ..settings import SettingsError
from .flwr_cli import QUIET, Flwr, see_run_through, write_connection
from .preflight import preflight
from .supernode import wait_reachable

log = logging.getLogger("zk0")
# The Flower App that `flwr run` packages: the source checkout next to this package, or the copy
# the Docker image keeps (an installed package has no pyproject.toml beside it).
APP_DIRS = (Path(__file__).resolve().parents[2], Path("/opt/zk0-src/app"))


def find_app_dir(given: Path | None) -> Path:
    """The app directory to submit: the one given, else the first known one holding pyproject.toml."""
    for candidate in [given] if given else APP_DIRS:
        if (candidate / "pyproject.toml").is_file():
            return candidate.resolve()
    where = given or " or ".join(map(str, APP_DIRS))
    raise SettingsError(
        f"no Flower App at {where} (no pyproject.toml); pass --app DIR, the folder holding app/pyproject.toml"
    )


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
    experiment = preflight(env_file, "server")
    settings = experiment.settings
    app = find_app_dir(app_dir)
    if root_certificates is not None and not root_certificates.is_file():
        raise SettingsError(f"--root-certificates {root_certificates} does not exist")
    wait_reachable(address, tries, wait)
    if root_certificates is None:
        log.warning("connecting to SuperLink %s without TLS: use --root-certificates across networks", address)

    with tempfile.TemporaryDirectory(prefix="zk0-submit-") as tmp:
        flwr_home = Path(experiment.env.get("FLWR_HOME") or Path(tmp) / "flwr-home")
        conn = write_connection(flwr_home, address, root_certificates)
        flwr = Flwr({**os.environ, "FLWR_HOME": str(flwr_home), **QUIET}, conn)
        run_config = Path(tmp) / "run-config.toml"
        run_config.write_text(tomli_w.dumps(settings.to_flower_config()))

        def submit() -> str:
            wait_reachable(address, tries, wait)  # a resubmission waits for the SuperLink to be back
            run_id = flwr.submit(app, run_config)
            log.info("run %s submitted to %s; outputs in %s (on the ServerApp's host)", run_id, address,
                     settings.output_dir)
            return run_id

        started = time.monotonic()
        run_id, status = see_run_through(flwr, submit, poll)
    log.info("run %s: %s after %.0fs", run_id, status, time.monotonic() - started)
    return 0 if status == "finished:completed" else 1
