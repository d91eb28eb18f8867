"""One `zk0 local` per output folder: an exclusive lock held for the whole run (standard library only).

The ServerApp holds OUTPUT_DIR/.lock while it writes (zk0.server.runtime); this lock is another file, taken
before any SuperLink or SuperNode starts, so a second run on the same folder is refused at once instead of
starting a federation whose ServerApp would wait for the first one's lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from pathlib import Path

from ..settings import SettingsError

log = logging.getLogger("zk0")
LOCK_NAME = ".zk0-local.lock"


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


def _refusal(out_dir: Path, fd: int) -> SettingsError:
    """The error naming the run that holds the lock and what to do."""
    holder = {}
    for _ in range(10):  # the holder writes its PID just after taking the lock
        if holder := _holder(fd):
            break
        time.sleep(0.02)
    pid, cmd = holder.get("pid", "?"), holder.get("cmd", "an unknown command")
    return SettingsError(
        f"ZK0_OUTPUT_DIR={out_dir} is in use by another `zk0 local` (PID {pid}: {cmd}): wait for it to end, "
        f"stop it (kill {pid}), or set ZK0_OUTPUT_DIR to another folder"
    )


def lock_run(out_dir: Path) -> int:
    """Take OUTPUT_DIR/.zk0-local.lock for this process (a file descriptor, held until release_run or exit).

    Raises SettingsError naming the holder when another process holds it. The kernel drops the lock with
    its process, however that ends: a file left by a dead one is taken over, with a line saying so.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Not truncated on open: a refused process must still read the holder's line. Not inherited by children
    # (os.open's default), so no SuperLink or SuperNode keeps the lock after this process ends.
    fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        err = _refusal(out_dir, fd)
        os.close(fd)
        raise err from None
    old = _holder(fd)
    if (pid := old.get("pid")) and pid != os.getpid() and not (isinstance(pid, int) and _alive(pid)):
        log.warning("%s names PID %s (%s), which is gone without releasing it: taking it over",
                    out_dir / LOCK_NAME, pid, old.get("cmd", "?"))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "cmd": " ".join(sys.orig_argv), "started": time.time()}).encode(), 0)
    return fd


def release_run(fd: int) -> None:
    """Empty the lock file (a clean end leaves nothing to take over) and drop the lock."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)
