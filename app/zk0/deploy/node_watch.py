"""`zk0 local`'s watch on its SuperNodes: a ClientApp that keeps failing to start is reported at once and
given up on after GIVE_UP_AFTER seconds, instead of holding its round until ZK0_ROUND_TIMEOUT.

Flower 1.42 gives each new ClientApp process 30 s (its task token's start window) to check in with its
SuperNode. One that dies, hangs or is starved of CPU before then is started again when the window ends,
without limit: the reply never comes, the round waits for ZK0_ROUND_TIMEOUT, and the only trace is in
the SuperNode's log (task-token 401s, tracebacks, exit codes). A ClientApp that fails after it started
is Flower's to handle: it replies with the error, or with "ClientApp stopped responding" 60 s after
the process died.

So each SuperNode's log and processes are read every POLL seconds (standard library only). Each
distinct failure is printed with Flower's reason; a node whose ClientApp has failed and has not started
GIVE_UP_AFTER seconds after the message arrived is given up on: why goes to OUTPUT_DIR/local/
node-faults.json for the ServerApp's log, and the SuperNode is stopped, so the SuperLink answers for it
at once ("node unavailable") and the round goes on without it, or fails loudly below ZK0_MIN_NODES.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..files import atomic_write_json
from ..node_faults import FAULTS_FILE, STARTED, read_faults
from .proc_table import clientapps, process_table

log = logging.getLogger("zk0")

# Three of Flower's 30 s start windows: a start that failed in a passing load spike gets two more tries.
GIVE_UP_AFTER = 90.0
POLL = 2.0  # seconds between looks at the logs and the process table
NO_APP_FOR = 15.0  # a received message without a ClientApp process this long: its process died early
TWO_APPS_FOR = 10.0  # two ClientApp processes for one message this long: Flower started another one
STOP_GRACE = 15.0  # seconds a given-up SuperNode has to deregister after SIGTERM, before SIGKILL
MAX_LINES = 3  # distinct failures printed per message: a crash loop repeats itself

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_RECEIVING = re.compile(r"Receiving: (\S+) message")
_API_ERROR = re.compile(r"\[(/v1/runtime/[\w-]+)\]\[ApiError:(\d+)\] (.+)")
_EXIT = re.compile(r"Exit Code: (\d+)")
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)(: .*)?$")


@dataclass
class NodeTracker:
    """One SuperNode's message whose ClientApp has not started yet, as the node's log and processes tell."""

    name: str
    node_id: str = ""
    message: str = ""  # the type of that message; '' while no ClientApp is starting
    arrived: float = 0.0
    received: bool = False  # its objects are in: Flower has a task for the ClientApp
    failures: dict[str, str] = field(default_factory=dict)  # distinct failures: key -> reason
    printed: int = 0
    given_up: bool = False
    give_up_after: float = GIVE_UP_AFTER  # seconds from the message's arrival to giving up on a failing start
    _in_traceback: bool = False
    _exit_code: str = ""
    _no_app: float | None = None
    _two_apps: float | None = None

    @property
    def label(self) -> str:
        return f"{self.name} (SuperNode {self.node_id})" if self.node_id else self.name

    @property
    def reasons(self) -> str:
        """Every distinct failure of this start-up, first first."""
        return "; ".join(self.failures.values())

    def feed(self, line: str, now: float) -> str | None:
        """Take one line of the node's log; return a line to print when a failing start recovered."""
        line = _ANSI.sub("", line).rstrip()
        if match := _NODE_ID.search(line):
            self.node_id = match.group(1)
        elif match := _RECEIVING.search(line):
            self._begin(match.group(1), now)
        elif self.message:
            return self._starting(line, now)
        return None

    def _begin(self, message: str, now: float) -> None:
        self.message, self.arrived, self.received, self.printed = message, now, False, 0
        self.failures = {}
        self._in_traceback, self._exit_code, self._no_app, self._two_apps = False, "", None, None

    def _starting(self, line: str, now: float) -> str | None:
        """A log line while the ClientApp is starting: the end of the start-up, or a failure."""
        if STARTED in line or "Sending: " in line or "Failed to receive message" in line:
            # Started, answered (maybe with Flower's error reply), or dropped by Flower: over either way.
            note = None
            if self.failures and "Failed to receive" not in line:
                what = "its ClientApp started for" if STARTED in line else "a reply went out for"
                note = (f"{self.label}: {what} its {self.message} message {now - self.arrived:.0f} s after the message "
                        f"arrived, after {len(self.failures)} kind(s) of failure")
            self.message = ""
            return note
        if "Received successfully" in line:
            self.received = True
        elif reason := self._reason(line):
            key = re.sub(r" on /v1/runtime/[\w-]+", "", reason)  # one 401 is logged once per endpoint
            self.failures.setdefault(key, reason)
        return None

    def _reason(self, line: str) -> str | None:
        """Flower's reason, when this line (with those before it) says that a ClientApp failed to start."""
        if self._exit_code:  # flwr_exit's message follows its code
            code, self._exit_code = self._exit_code, ""
            return f"flwr-clientapp exited with Flower exit code {code}: {line.strip()}"
        if self._in_traceback and _EXCEPTION.match(line):
            self._in_traceback = False
            return line
        if line.startswith("Traceback (most recent call last)"):
            self._in_traceback = True
        elif match := _EXIT.search(line):
            self._exit_code = match.group(1)
        elif match := _API_ERROR.search(line):
            return f"{match.group(3)} (Flower runtime API error {match.group(2)} on {match.group(1)})"
        return None

    def observe(self, live: int, ended: str, now: float) -> None:
        """Take how many ClientApp processes of this node run, and how the last one that ended did."""
        if not self.message:
            return
        self._no_app = _since(self._no_app, now) if self.received and not live else None
        self._two_apps = _since(self._two_apps, now) if live >= 2 else None
        if self._no_app is not None and now - self._no_app >= NO_APP_FOR:
            self.failures.setdefault("no-app", f"no ClientApp process has run for it for {NO_APP_FOR:.0f} s{ended}")
        if self._two_apps is not None and now - self._two_apps >= TWO_APPS_FOR:
            self.failures.setdefault("two-apps", "Flower started another ClientApp process: the first one did not "
                                                 "check in within Flower's 30 s start window")

    def report(self, now: float) -> list[str]:
        """Lines to print for failures not printed yet (at most MAX_LINES per message)."""
        lines = []
        for reason in list(self.failures.values())[self.printed:MAX_LINES]:
            text = (f"{self.label}: ClientApp for its {self.message} message failed to start "
                    f"({now - self.arrived:.0f} s after the message arrived): {reason}")
            if not self.printed:
                text += (f"; Flower keeps retrying, zk0 gives up on {self.name} if it has not started "
                         f"{self.give_up_after:.0f} s after the message arrived")
            lines.append(text)
            self.printed += 1
        return lines

    def should_give_up(self, now: float) -> bool:
        """True once: the ClientApp has failed and still not started give_up_after s after the message arrived."""
        return (bool(self.message and self.failures) and not self.given_up
                and now - self.arrived >= self.give_up_after)


def _since(start: float | None, now: float) -> float:
    """When a condition that still holds began."""
    return now if start is None else start


class NodeWatch:
    """Follows every SuperNode of `zk0 local` in a thread: reports failing ClientApp starts, gives up on nodes."""

    def __init__(self, workdir: Path, names: list[str]):
        logs = [workdir / "logs" / f"supernode-{i}.log" for i in range(len(names))]
        # The logs are appended to across resumed runs: only what this run writes is read.
        self.logs = {i: [path, path.stat().st_size if path.exists() else 0, b""] for i, path in enumerate(logs)}
        self.trackers = [NodeTracker(name) for name in names]
        self.faults = workdir / FAULTS_FILE
        atomic_write_json(self.faults, {})
        self.procs: list[subprocess.Popen] = []
        self.stopped_at: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="zk0-node-watch", daemon=True)

    def start(self, procs: list[subprocess.Popen]) -> None:
        """Watch these SuperNodes (in the order of the names)."""
        self.procs = procs
        self._thread.start()

    def stop(self) -> None:
        """End the watch; before the SuperNodes are stopped, whose ends are no failures."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(POLL):
            try:
                self.poll(time.monotonic())
            except Exception:  # a watch that dies would leave the next stalled round unexplained
                log.exception("watching the SuperNodes failed; going on")

    def poll(self, now: float) -> None:
        """Read what each SuperNode logged since the last poll, look at its processes, act on it."""
        live = [i for i, proc in enumerate(self.procs) if not self.trackers[i].given_up and proc.poll() is None]
        for index in live:  # a SuperNode that ended by itself is not this watch's to judge
            for line in self._new_lines(index):
                if note := self.trackers[index].feed(line, now):
                    log.info(note)
        table = process_table() if any(self.trackers[i].message for i in live) else {}
        for index in live:
            tracker = self.trackers[index]
            tracker.observe(*clientapps(table, self.procs[index].pid), now)
            for line in tracker.report(now):
                log.warning(line)
            if tracker.should_give_up(now):
                self._give_up(index, now)
        for index in self.stopped_at:
            self._end(index, now)

    def _new_lines(self, index: int) -> list[str]:
        entry = self.logs[index]
        path, offset, partial = entry
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = partial + f.read()
        except OSError:
            return []
        entry[1] = offset + len(data) - len(partial)
        *lines, entry[2] = data.split(b"\n")  # a line still being written waits for the next poll
        return [line.decode(errors="replace") for line in lines]

    def _give_up(self, index: int, now: float) -> None:
        """Note why (for the ServerApp), then stop the SuperNode: the SuperLink answers for it at once."""
        tracker, proc = self.trackers[index], self.procs[index]
        tracker.given_up = True
        waited = f"{now - tracker.arrived:.0f} s"
        faults = read_faults(self.faults)
        faults[tracker.node_id] = (f"{tracker.label} given up on by zk0 local: its ClientApp failed to start "
                                   f"for {waited}: {tracker.reasons}")
        atomic_write_json(self.faults, faults)
        log.warning("%s: giving up on the node: its ClientApp has failed to start for %s since its %s message arrived "
                    "(%s); stopping its SuperNode, so the SuperLink reports it unavailable and the round goes on "
                    "without it if ZK0_MIN_NODES nodes are left",
                    tracker.label, waited, tracker.message, tracker.reasons)
        self._signal(proc, signal.SIGTERM)
        self.stopped_at[index] = now

    def _end(self, index: int, now: float) -> None:
        """A given-up SuperNode that has not deregistered within STOP_GRACE is killed."""
        if self.procs[index].poll() is None and now - self.stopped_at[index] >= STOP_GRACE:
            self._signal(self.procs[index], signal.SIGKILL)

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
