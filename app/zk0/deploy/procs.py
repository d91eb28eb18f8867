"""Processes that end with the process that started them, whatever ends it (SIGKILL included).

`zk0 local` and `zk0 supernode` start Flower processes that start others (SuperExec, ServerApp,
ClientApps, warm workers), each in a session of its own: a signal to the owner's process group never
reaches them, and an owner killed with SIGKILL runs no cleanup. Three layers end them all:

- every direct child gets a Linux parent-death signal: the kernel kills it when its owner dies;
- a guard process, in a session of its own, waits for the owner to die and then ends every process
  whose environment carries the owner's mark. The mark is an environment variable: Flower and the
  warm worker start their children with their own environment, so every descendant inherits it,
  however deep and whoever adopted it;
- Flower's processes watch their parents (`--parent-pid`) and the warm worker its owner, in case the
  guard itself was killed.

Only the standard library is imported here: the guard starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

# Not a ZK0_ name: zk0 refuses unknown ZK0_ variables, and every process below an owner inherits it.
MARK = "ZK0GUARD"
PR_SET_PDEATHSIG = 1
GRACE = 2.0  # seconds between asking leftovers to stop (SIGTERM) and killing them
POLL = 0.2  # seconds between the guard's looks at its owner
APP_ROOT = Path(__file__).resolve().parents[2]  # the folder holding this copy of the zk0 package

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(sig: int = signal.SIGKILL):
    """A preexec_fn: the child gets `sig` when the process that started it dies.

    The kernel sends it when the forking *thread* exits, so owners start children from their main
    thread. A parent that died between fork and prctl is caught by comparing the parent pid.
    """
    parent = os.getpid()
    prctl = _libc.prctl if _libc is not None else None  # looked up before fork: the child only calls it

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def popen_owned(cmd: list[str], **kwargs) -> subprocess.Popen:
    """Popen a child that dies with this process, in a session of its own (a terminal's Ctrl-C reaches
    only this process, which then stops its children in order)."""
    return subprocess.Popen(cmd, preexec_fn=die_with_parent(), start_new_session=True, **kwargs)


def start_guard(env: dict[str, str]) -> dict[str, str]:
    """Start a guard for this process; return `env` with its mark, to start every child with."""
    token = f"{os.getpid()}-{secrets.token_hex(6)}"
    guard_env = {k: v for k, v in env.items() if k != MARK}
    guard_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(APP_ROOT), env.get("PYTHONPATH")]))
    # Its own session, no parent-death signal: it must outlive this process to clean up after it.
    subprocess.Popen([sys.executable, "-m", "zk0.deploy.procs", "--owner", str(os.getpid()), "--mark", token],
                     env=guard_env, stdin=subprocess.DEVNULL, start_new_session=True)
    return {**env, MARK: token}


def marked(token: str) -> list[int]:
    """Live processes (other than this one) whose environment carries MARK=token."""
    needle = f"{MARK}={token}".encode()
    pids = []
    if not os.path.isdir("/proc"):  # not Linux: the parent-death signals and Flower's own watches are all there is
        return pids
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        # OSError: gone meanwhile, or another user's.
        with contextlib.suppress(OSError), open(f"/proc/{entry.name}/environ", "rb") as f:
            if needle in f.read().split(b"\0"):  # a zombie's environment reads empty
                pids.append(int(entry.name))
    return pids


def _parent_and_state(pid: int) -> tuple[int, str] | None:
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0]


def end_children(parent: int, timeout: float) -> list[int]:
    """SIGTERM the live children of `parent` (not ours: its to reap) and wait up to `timeout` s until each has
    exited (gone or a zombie); return their ids."""
    pids = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
    kids = [pid for pid in pids if (found := _parent_and_state(pid)) and found[0] == parent and found[1] != "Z"]
    for pid in kids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any((found := _parent_and_state(pid)) and found[1] != "Z" for pid in kids):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return kids


def end_marked(token: str | None, grace: float = GRACE) -> int:
    """SIGTERM every process marked with token, SIGKILL those left after `grace` s; return how many there were.

    Rescans until none is left, so a process started during the sweep is caught too; gives up on a
    process the kernel has not ended 10 s after its SIGKILL (stuck in uninterruptible I/O).
    """
    if not token:
        return 0
    seen: set[int] = set()
    deadline = time.monotonic() + grace
    while (pids := marked(token)) and time.monotonic() < deadline + 10:
        late = time.monotonic() > deadline
        for pid in pids:
            if late or pid not in seen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
        seen.update(pids)
        time.sleep(0.05)
    return len(seen)


def guard(owner: int, token: str) -> int:
    """Wait until `owner` is gone, then end every process carrying its mark.

    The guard is the owner's child: the kernel re-parents it the moment the owner dies, whether or
    not anyone reaps the owner, so a changed parent pid is the signal.
    """
    while os.getppid() == owner:
        time.sleep(POLL)
    if ended := end_marked(token):
        print(f"zk0: process {owner} is gone; ended {ended} process(es) it had started", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """python -m zk0.deploy.procs --owner PID --mark TOKEN: the guard start_guard() starts."""
    p = argparse.ArgumentParser(prog="python -m zk0.deploy.procs")
    p.add_argument("--owner", type=int, required=True)
    p.add_argument("--mark", required=True)
    args = p.parse_args(argv)
    return guard(args.owner, args.mark)


if __name__ == "__main__":
    sys.exit(main())
