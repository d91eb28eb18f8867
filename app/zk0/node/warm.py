"""A node's warm worker: one long-lived process per SuperNode that keeps the policy loaded.

Flower 1.42 starts a new ClientApp process for every message, so each message would pay for
importing torch and LeRobot, loading the policy and opening the dataset again (seconds for the tiny
demo, over ten for the full-size model). The ClientApp instead hands each request to this worker over
a Unix socket: the first message of a SuperNode starts it, the next ones find the policy loaded.

Only the standard library is imported here, so a ClientApp that talks to a worker never imports
torch. The worker belongs to the process that started the ClientApp (Flower's SuperExec): it exits
when that process is gone, after IDLE_TIMEOUT seconds without a request, or when a worker for
another version of the app takes its place. Its socket lives in a directory only this user can
enter, and every connection also proves a per-worker key.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

from .messages import NodeReply, NodeRequest, WorkerExit, WorkerFailure

log = logging.getLogger("zk0")

IDLE_TIMEOUT = 3600.0  # seconds without a request before a worker frees its memory
START_TIMEOUT = 60.0  # seconds for a new worker to listen (it binds before importing torch)
APP_ROOT = Path(__file__).resolve().parents[2]  # the folder holding this copy of the zk0 package


class WorkerError(RuntimeError):
    """The worker failed a request or died; the message says which and what happened."""


def worker_dir() -> Path:
    """A directory for worker sockets that only this user may enter."""
    path = Path(tempfile.gettempdir()) / f"zk0-workers-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise WorkerError(f"{path} must belong to this user with mode 0700: remove it and retry")
    return path


def address_for(owner_pid: int) -> Path:
    """The socket of the worker serving `owner_pid` with this copy of the app."""
    code = hashlib.sha256(str(APP_ROOT).encode()).hexdigest()[:12]
    return worker_dir() / f"{owner_pid}-{code}.sock"


def _key(address: Path) -> bytes:
    return address.with_suffix(".key").read_bytes()


def _connect(address: Path) -> Connection | None:
    """A connection to a live worker at `address`, or None when there is none."""
    try:
        return Client(str(address), family="AF_UNIX", authkey=_key(address))
    except (FileNotFoundError, ConnectionRefusedError, EOFError, ConnectionResetError):
        return None


def _retire_others(address: Path, owner_pid: int) -> None:
    """Ask this owner's workers for other app versions to exit: only one holds a policy in memory."""
    for other in address.parent.glob(f"{owner_pid}-*.sock"):
        if other != address and (conn := _connect(other)) is not None:
            with conn, contextlib.suppress(OSError):
                conn.send(WorkerExit())


def _remove_stale(directory: Path) -> None:
    """Delete the sockets, keys and locks of owners that are gone: a SIGKILLed node leaves them behind."""
    for path in directory.glob("*-*.*"):
        owner = path.name.split("-", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            path.unlink(missing_ok=True)


def _spawn(address: Path, owner_pid: int, idle_timeout: float) -> subprocess.Popen:
    address.unlink(missing_ok=True)  # a dead worker's socket
    fd = os.open(address.with_suffix(".key"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as key:
        key.write(secrets.token_bytes(32))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(APP_ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "zk0.node.warm", "--address", str(address), "--owner-pid", str(owner_pid),
           "--idle-timeout", str(idle_timeout)]
    # Its own session: Flower stops a ClientApp's process group when the message is done.
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)


def connect(owner_pid: int | None = None, idle_timeout: float = IDLE_TIMEOUT) -> Connection:
    """A connection to the warm worker of `owner_pid` (default: this process's parent), started if needed."""
    owner_pid = os.getppid() if owner_pid is None else owner_pid
    address = address_for(owner_pid)
    with open(address.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one start at a time when messages arrive together
        if (conn := _connect(address)) is not None:
            return conn
        _remove_stale(address.parent)
        _retire_others(address, owner_pid)
        proc = _spawn(address, owner_pid, idle_timeout)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if (conn := _connect(address)) is not None:
                log.info("started warm worker %d (%s)", proc.pid, address.name)
                return conn
            if proc.poll() is not None:
                raise WorkerError(
                    f"warm worker exited with code {proc.returncode} before listening; see the lines above"
                )
            time.sleep(0.05)
        proc.kill()
        raise WorkerError(f"warm worker did not listen on {address} within {START_TIMEOUT:.0f}s")


def call(request: NodeRequest, owner_pid: int | None = None) -> NodeReply:
    """Send one request to the warm worker and return its reply; raises WorkerError on failure."""
    with connect(owner_pid) as conn:
        conn.send(request)
        try:
            reply = conn.recv()
        except (EOFError, ConnectionResetError) as err:
            raise WorkerError(
                f"warm worker died during the {request.kind} request ({err or 'connection closed'}); "
                "its log is the SuperNode's; the next message starts a new one"
            ) from None
    if isinstance(reply, WorkerFailure):
        raise WorkerError(reply.error)
    return reply


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


class _Watch(threading.Thread):
    """Ends the worker when its owner is gone or it has been idle too long."""

    def __init__(self, address: Path, owner_pid: int, idle_timeout: float):
        super().__init__(daemon=True)
        self.address, self.owner_pid, self.idle_timeout = address, owner_pid, idle_timeout
        self.busy, self.last = False, time.monotonic()

    def run(self) -> None:
        while True:
            time.sleep(0.5)  # an orphaned worker is gone within a second of its owner
            if not _alive(self.owner_pid):
                reason = f"its owner {self.owner_pid} is gone"
                # No ClientApp of that owner will come: its start lock can go too.
                self.address.with_suffix(".lock").unlink(missing_ok=True)
            elif not self.busy and time.monotonic() - self.last > self.idle_timeout:
                reason = f"idle for {self.idle_timeout:.0f}s"
            else:
                continue
            log.info("warm worker %d exits: %s", os.getpid(), reason)
            cleanup(self.address)
            os._exit(0)


def _exit_cleanly(address: Path) -> None:
    """SIGTERM (a stopping `zk0 local` or node): leave no socket or key behind."""
    log.info("warm worker %d exits: asked to stop", os.getpid())
    cleanup(address)
    os._exit(0)


def cleanup(address: Path) -> None:
    """Remove a worker's socket and key."""
    for path in (address, address.with_suffix(".key")):
        path.unlink(missing_ok=True)


def serve(address: Path, owner_pid: int, idle_timeout: float) -> int:
    """Answer requests one at a time until told to exit or the watcher ends the process."""
    signal.signal(signal.SIGTERM, lambda *_: _exit_cleanly(address))  # before a client can find it
    # Listen first: importing torch takes seconds.
    listener = Listener(str(address), family="AF_UNIX", authkey=_key(address))
    watch = _Watch(address, owner_pid, idle_timeout)
    watch.start()
    from ..logs import setup_logging
    from .worker import NodeWorker

    setup_logging()
    worker = NodeWorker()
    try:
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError, AuthenticationError) as err:  # a client that failed the key or hung up
                log.warning("warm worker: refused a connection: %s", err)
                continue
            with conn:
                watch.busy = True
                try:
                    request = conn.recv()
                    if isinstance(request, WorkerExit):
                        log.info("warm worker %d exits: a newer app version took over", os.getpid())
                        return 0
                    try:
                        reply = worker.handle(request)
                    except Exception as err:  # noqa: BLE001  the ClientApp raises it; the worker lives on
                        log.error("warm worker: %s request failed:\n%s", request.kind, traceback.format_exc())
                        reply = WorkerFailure(f"{type(err).__name__}: {err}")
                    conn.send(reply)
                except (EOFError, OSError) as err:  # the ClientApp was stopped mid-request
                    log.warning("warm worker: ClientApp went away: %s", err)
                finally:
                    watch.busy, watch.last = False, time.monotonic()
    finally:
        listener.close()
        cleanup(address)


def main(argv: list[str] | None = None) -> int:
    """python -m zk0.node.warm --address SOCKET --owner-pid PID: run a worker (started by connect())."""
    p = argparse.ArgumentParser(prog="python -m zk0.node.warm")
    p.add_argument("--address", type=Path, required=True)
    p.add_argument("--owner-pid", type=int, required=True)
    p.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT)
    args = p.parse_args(argv)
    return serve(args.address, args.owner_pid, args.idle_timeout)


if __name__ == "__main__":
    sys.exit(main())
