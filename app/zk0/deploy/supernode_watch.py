"""`zk0 supernode`'s watch on its own SuperNode: a ClientApp that never starts is reported as `zk0 local`
reports it (zk0.deploy.node_watch's NodeTracker, on the SuperNode's output as it passes through), and
GIVE_UP s after its message arrived the SuperNode is stopped and `zk0 supernode` exits with GAVE_UP.

A robot host has no `zk0 local` beside it to notice: without the watch, a node whose ClientApps die
before they check in (a broken environment, a host too loaded to start one) stays connected, is sent
every round's message and never answers, and the round waits for ZK0_ROUND_TIMEOUT while the only
trace is in this node's own log. Stopping the SuperNode makes the SuperLink answer for it at once
("node unavailable"); under Compose (`restart: unless-stopped`) it is started again, as a fresh try.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time

from .node_watch import GIVE_UP_AFTER, POLL, STOP_GRACE, NodeTracker
from .proc_table import clientapps, process_table
from .procs import popen_owned

log = logging.getLogger("zk0")
GAVE_UP = 4  # zk0 supernode's exit code when it gave up on its ClientApp


def run_watched(cmd: list[str], env: dict[str, str], name: str, give_up_after: float = GIVE_UP_AFTER) -> int:
    """Run the SuperNode `cmd`, its output passed through and read; its exit code, or GAVE_UP."""
    proc = popen_owned(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # The SuperNode is in a session of its own: a terminal's Ctrl-C or a container's SIGTERM reaches this
    # process, which passes it on, so the node deregisters as it would if it had received it itself.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: _signal(proc, signum))
    tracker = NodeTracker(name, give_up_after=give_up_after)
    streams = {proc.stdout.fileno(): [sys.stdout.buffer, b""], proc.stderr.fileno(): [sys.stderr.buffer, b""]}
    while proc.poll() is None:
        now = time.monotonic()
        for line in _read(streams, POLL):
            if note := tracker.feed(line, now):
                log.info(note)
        if tracker.message:
            tracker.observe(*clientapps(process_table(), proc.pid), now)
        for line in tracker.report(now):
            log.warning(line)
        if tracker.should_give_up(now):
            return _give_up(proc, tracker, now)
    deadline = time.monotonic() + 1.0  # what it wrote last; its SuperExec may hold the pipes open after it ended
    while _read(streams, 0.1) and time.monotonic() < deadline:
        pass
    return 128 - proc.returncode if proc.returncode < 0 else proc.returncode  # killed by a signal: as a shell says


def _read(streams: dict[int, list], wait: float) -> list[str]:
    """Pass on what the SuperNode wrote within `wait` s; its complete lines (a line still being written waits)."""
    lines = []
    ready, _, _ = select.select([fd for fd in streams if streams[fd][0] is not None], [], [], wait)
    for fd in ready:
        out, partial = streams[fd]
        data = os.read(fd, 1 << 16)
        if not data:  # closed: nothing more from it
            streams[fd][0] = None
            continue
        out.write(data)
        out.flush()
        *complete, streams[fd][1] = (partial + data).split(b"\n")
        lines += [line.decode(errors="replace") for line in complete]
    return lines


def _give_up(proc: subprocess.Popen, tracker: NodeTracker, now: float) -> int:
    """Say why and what to do, stop the SuperNode (it deregisters), return GAVE_UP."""
    log.error("%s: giving up: its ClientApp has failed to start for %.0f s since its %s message arrived (%s). "
              "Stopping this SuperNode, so the SuperLink reports it unavailable and the round goes on without it "
              "if ZK0_MIN_NODES nodes are left. To do: fix what the failure above names (the SuperNode's own lines "
              "above have Flower's full output; a ClientApp that cannot start is most often a broken Python "
              "environment or a host too loaded to start one in Flower's 30 s window), then start zk0 supernode "
              "again (Compose restarts it by itself); --give-up-after sets this bound (now %.0f s)",
              tracker.label, now - tracker.arrived, tracker.message, tracker.reasons, tracker.give_up_after)
    _signal(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        _signal(proc, signal.SIGKILL)
        proc.wait()
    return GAVE_UP


def _signal(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
