"""`zk0 supernode`: join a remote federation from a robot host, after checking what can be checked."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path

import tomli_w

from ..settings import NodeSettings, SettingsError
from .flwr_cli import QUIET, bin_path
from .node_loop import OWN, POLL_SECONDS
from .preflight import preflight
from .procs import start_guard

log = logging.getLogger("zk0")


# Flower's SuperExec looks for a new message's task every second by default; a quarter second takes
# ~0.4 s off every message on average for a few cheap loopback requests. Part of the fast loop only:
# Flower's own loop runs with Flower's own settings.
TASK_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(POLL_SECONDS)}


class UnreachableError(RuntimeError):
    """The SuperLink address does not answer; the message names it and what to do."""


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) as Flower's --superlink takes it."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SettingsError(f"--superlink {address!r}: expected HOST:PORT, e.g. superlink.example.org:8000")
    return host.strip("[]"), int(port)


def wait_reachable(address: str, tries: int, wait: float) -> None:
    """Open a TCP connection to the SuperLink, `tries` times `wait` seconds apart at most."""
    host, port = split_address(address)
    error: OSError | None = None
    for attempt in range(1, tries + 1):
        try:
            with socket.create_connection((host, port), timeout=max(wait, 1.0)):
                return
        except OSError as err:
            error = err
            log.warning("SuperLink %s not reachable (try %d of %d): %s", address, attempt, tries, err)
        if attempt < tries:
            time.sleep(wait)
    raise UnreachableError(
        f"SuperLink {address} is not reachable after {tries} tries {wait:g}s apart ({error}): check that it runs, "
        "that the host name resolves from here and that the port is open in firewalls; then start this SuperNode "
        "again (--connect-tries / --connect-wait allow more time)"
    )


def node_config(node: NodeSettings) -> str:
    """The node's settings as Flower's --node-config (TOML values, space separated)."""
    toml = {key: tomli_w.dumps({"v": value}).split("=", 1)[1].strip() for key, value in node.to_flower_config().items()}
    return " ".join(f"{key}={value}" for key, value in toml.items())


def supernode_command(
    superlink: str,
    node: NodeSettings,
    *,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 9094,
    fast_loop: bool = False,
) -> list[str]:
    """The flower-supernode command line for one node: Flower's own program, or with `fast_loop` the same
    through zk0.deploy.node_loop (shorter waits, forked ClientApps); TLS when a CA is given, else --insecure."""
    program = [sys.executable, "-m", "zk0.deploy.node_loop"] if fast_loop else [bin_path("flower-supernode")]
    cmd = [*program, "--superlink", superlink, "--node-config", node_config(node)]
    if root_certificates is not None:
        cmd += ["--root-certificates", str(root_certificates)]
    else:
        cmd += ["--insecure"]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    # Connection retries stay unlimited (Flower's default): a node outlives a SuperLink restart.
    return [*cmd, "--host", host, "--port", str(port)]


def run_supernode(args) -> int:
    """Validate, check the address, then become flower-supernode (never returns on success).

    The node's settings are ZK0_NODE_<args.index>_* with --index (as `zk0 local` and the Compose
    services give them), else ZK0_<FIELD>; from the environment, then --env-file.

    This process becomes flower-supernode, so a signal to it reaches Flower directly; a guard
    (zk0.deploy.procs) ends its SuperExec, ClientApps and warm worker if it dies without stopping them.
    """
    for path in (args.root_certificates, args.auth_key):
        if path is not None and not path.is_file():
            raise SettingsError(f"{path} does not exist; make it with superlink/make-certs.sh on the SuperLink's host")
    if args.auth_key is not None and args.root_certificates is None:
        raise SettingsError("--auth-key needs --root-certificates: SuperNode authentication only works over TLS")
    # Without ZK0_BASE_POLICY the node trains the server's base policy, which it learns of only with the
    # first message: its dataset is checked against zk0's default, lerobot/smolvla_base's layout.
    (node,) = preflight(args.env_file, "node", args.index, download=True).nodes
    if args.root_certificates is None:
        log.warning("no --root-certificates: connecting without TLS; use this only inside one trusted machine or "
                    "network")
    wait_reachable(args.superlink, args.connect_tries, args.connect_wait)
    cmd = supernode_command(
        args.superlink, node, root_certificates=args.root_certificates, auth_key=args.auth_key,
        host=args.host, port=args.port, fast_loop=args.fast_loop,
    )
    if args.fast_loop:  # zk0.deploy.node_loop says which loop it runs once it has checked Flower's
        log.info("SuperLink %s reachable; starting zk0's fast loop (--fast-loop)", args.superlink)
    else:
        log.info("SuperLink %s reachable; %s (flower-supernode and flower-superexec as Flower ships them; "
                 "--fast-loop for zk0's)", args.superlink, OWN)
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    for key, value in {**QUIET, **(TASK_POLL if args.fast_loop else {})}.items():
        env.setdefault(key, value)
    env = start_guard(env)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)
    return 1  # not reached
