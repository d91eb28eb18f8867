"""One run per output folder: an exclusive lock on OUTPUT_DIR/.zk0-run.lock, held for the whole run (standard
library only).

The outermost process that writes the folder holds it: `zk0 local` before any SuperLink or SuperNode starts,
so a second `zk0 local` is refused at once; the ServerApp wherever no `zk0 local` started it (Compose, a
SuperLink started by hand, `zk0 submit`, which itself writes no output folder). A ServerApp below the
`zk0 local` that holds the lock goes on under it; one resubmitted for the same experiment after a SuperLink
restart waits for its predecessor to finish; any other is refused at once. The kernel drops the lock with
its process however that ends: a file left by a dead one is taken over, with a line saying so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from .errors import OutputInUse

log = logging.getLogger("zk0")
LOCK_NAME = ".zk0-run.lock"
LOCAL, SERVERAPP = "`zk0 local`", "ServerApp"  # the roles that hold it
_HELD: dict[Path, int] = {}  # this process's locks: a ServerApp built twice in one process takes its own again


def _holder(fd: int) -> dict:
    """What the lock file says of the process that took it ({} when empty or unreadable)."""
    with contextlib.suppress(OSError, ValueError):
        data = os.pread(fd, 4096, 0)
        found = json.loads(data) if data.strip() else {}
        return found if isinstance(found, dict) else {}
    return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _ancestors() -> set[int]:
    """This process's parent, grandparent, ... (from /proc; empty elsewhere)."""
    found, pid = set(), os.getpid()
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        found.add(pid)
    return found


def _read_holder(fd: int) -> dict:
    for _ in range(10):  # the holder writes its line just after taking the lock
        if holder := _holder(fd):
            return holder
        time.sleep(0.02)
    return {}


def _refusal(out_dir: Path, holder: dict) -> OutputInUse:
    """The error naming the run that holds the lock and what to do."""
    pid, cmd = holder.get("pid", "?"), holder.get("cmd", "an unknown command")
    here = holder.get("host") in (None, socket.gethostname())
    where = "" if here else f" on host {holder.get('host')}"
    stop = f"kill {pid}" if here else f"`flwr stop` its run, or kill {pid} on {holder.get('host')}"
    return OutputInUse(
        f"ZK0_OUTPUT_DIR={out_dir} is in use by another {holder.get('role', 'run')} (PID {pid}{where}: {cmd}): "
        f"wait for it to end, stop it ({stop}), or set ZK0_OUTPUT_DIR to another folder"
    )


def lock_run(out_dir: Path, role: str = LOCAL, experiment: str = "") -> int:
    """Take OUTPUT_DIR/.zk0-run.lock for this process (a file descriptor, held until release_run or exit).

    Raises OutputInUse naming the holder when another process holds it; `experiment` (a digest of the run's
    settings) tells a ServerApp resubmitted for the same experiment from another run.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = (out_dir / LOCK_NAME).resolve()
    if path in _HELD:
        return _HELD[path]
    # Not truncated on open: a refused process must still read the holder's line. Not inherited by children
    # (os.open's default), so no SuperLink or SuperNode keeps the lock after this process ends.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        err = _refusal(out_dir, holder)
        err.holder = holder
        os.close(fd)
        raise err from None
    old = _holder(fd)
    if (pid := old.get("pid")) and pid != os.getpid() and not (isinstance(pid, int) and _alive(pid)):
        log.warning("%s names PID %s (%s), which is gone without releasing it: taking it over",
                    out_dir / LOCK_NAME, pid, old.get("cmd", "?"))
    os.ftruncate(fd, 0)
    line = {"pid": os.getpid(), "cmd": " ".join(sys.orig_argv), "role": role, "host": socket.gethostname(),
            "experiment": experiment, "started": time.time()}
    os.pwrite(fd, json.dumps(line).encode(), 0)
    _HELD[path] = fd
    return fd


def release_run(fd: int) -> None:
    """Empty the lock file (a clean end leaves nothing to take over) and drop the lock."""
    for path, held in list(_HELD.items()):
        if held == fd:
            del _HELD[path]
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)


def hold_for_serverapp(out_dir: Path, experiment: str, timeout: float = 300.0) -> int | None:
    """The ServerApp's share of the lock: None when the `zk0 local` that started it holds it, else the lock.

    A ServerApp of the same experiment still holding it (its SuperLink restarted and the run was submitted
    again while it finishes a checkpoint) is waited for, `timeout` s at most; anything else is refused at once.
    """
    deadline, said = time.monotonic() + timeout, False
    while True:
        try:
            return lock_run(out_dir, SERVERAPP, experiment)
        except OutputInUse as err:
            holder = err.holder
            if holder.get("host") == socket.gethostname() and holder.get("pid") in _ancestors():
                log.info("%s is held by the %s that started this ServerApp (PID %s)", Path(out_dir) / LOCK_NAME,
                         holder.get("role"), holder.get("pid"))
                return None
            if holder.get("role") != SERVERAPP or holder.get("experiment") != experiment:
                raise
            if time.monotonic() > deadline:
                raise OutputInUse(f"{err} (the same experiment's previous ServerApp has not ended for "
                                  f"{timeout:.0f} s)") from None
            if not said:
                log.warning("the same experiment's previous ServerApp (PID %s) still holds %s: waiting up to %.0f s "
                            "for it to end", holder.get("pid"), Path(out_dir) / LOCK_NAME, timeout)
                said = True
            time.sleep(1)
