"""A node whose ClientApp keeps failing to start is reported by `zk0 local` and given up on in bounded time."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
from datetime import datetime
from pathlib import Path

import pytest
from federation import ZK0, write_env
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

from zk0.deploy.node_watch import FAULTS_FILE, GIVE_UP_AFTER, MAX_LINES, NO_APP_FOR, POLL, STARTED, NodeTracker
from zk0.errors import RunFailed
from zk0.server.records import RunRecorder
from zk0.server.strategy import Zk0FedProx

# What a SuperNode logs (in colour: the watch strips it) while Flower restarts a starved ClientApp.
ARRIVES = ["INFO :      SuperNode ID: 42", "INFO :      [RUN 7]", "INFO :      Receiving: train message (ID: ab)",
           "INFO :      Received successfully", "INFO :      Start `flwr-clientapp` process"]
TOKEN_401 = [
    "\x1b[91mERROR \x1b[0m:     [/v1/runtime/send-task-heartbeat][ApiError:1008] "
    "Runtime task-token authentication failed.",
    "ERROR :     [/v1/runtime/pull-task-input][ApiError:1008] Runtime task-token authentication failed.",
    "INFO :      Task stopped.",
]


def tracker_after(lines: list[str], at: float = 0.0) -> NodeTracker:
    tracker = NodeTracker("node-1")
    for line in lines:
        tracker.feed(line, at)
    return tracker


def test_a_crash_loop_is_reported_once_per_reason_then_given_up_on_at_the_bound():
    tracker = tracker_after(ARRIVES + TOKEN_401 + ["Traceback (most recent call last):", '  File "x.py", line 1',
                                                   "ModuleNotFoundError: No module named 'lerobot'"], at=0)
    first, second = tracker.report(35)
    assert first.startswith("node-1 (SuperNode 42): ClientApp for its train message failed to start (35 s after")
    assert "Runtime task-token authentication failed. (Flower runtime API error 1008" in first
    assert f"gives up on node-1 if it has not started {GIVE_UP_AFTER:.0f} s after the message arrived" in first
    assert second.endswith("ModuleNotFoundError: No module named 'lerobot'")
    for line in TOKEN_401 * 3:  # the same failure again and again: nothing new to say
        tracker.feed(line, 60)
    assert tracker.report(60) == []
    assert not tracker.should_give_up(GIVE_UP_AFTER - 0.1)
    assert tracker.should_give_up(GIVE_UP_AFTER)


def test_a_start_that_recovers_or_never_failed_is_not_given_up_on():
    recovered = tracker_after(ARRIVES + TOKEN_401)
    note = recovered.feed(f"12:00:00 zk0 INFO: node-1: {STARTED} train message", 40)
    assert note.startswith("node-1 (SuperNode 42): its ClientApp started for its train message 40 s after")
    assert not recovered.should_give_up(GIVE_UP_AFTER * 10)
    slow = tracker_after(ARRIVES)  # alive but slow to start: Flower's own window decides, not zk0
    slow.observe(1, "", 0)
    slow.observe(1, "", GIVE_UP_AFTER * 10)
    assert slow.report(GIVE_UP_AFTER * 10) == [] and not slow.should_give_up(GIVE_UP_AFTER * 10)


def test_a_clientapp_that_dies_silently_or_hangs_is_seen_in_the_process_table():
    died = tracker_after(ARRIVES)
    died.observe(0, " (the last one was killed by SIGKILL)", 1)
    assert died.report(1 + NO_APP_FOR - 0.1) == []
    died.observe(0, " (the last one was killed by SIGKILL)", 1 + NO_APP_FOR)
    (line,) = died.report(1 + NO_APP_FOR)
    assert line.endswith(f"no ClientApp process has run for it for {NO_APP_FOR:.0f} s "
                         "(the last one was killed by SIGKILL)"
                         f"; Flower keeps retrying, zk0 gives up on node-1 if it has not started {GIVE_UP_AFTER:.0f} s "
                         "after the message arrived")
    hung = tracker_after(ARRIVES)
    hung.observe(2, "", 30)
    hung.observe(2, "", 40)
    assert "did not check in within Flower's 30 s start window" in hung.report(40)[0]


def test_the_server_names_a_node_given_up_on_and_why(tmp_path, monkeypatch):
    """The SuperLink signs its "node unavailable" reply with its own id: the strategy must still charge the
    node it answers for, with zk0 local's reason rather than Flower's generic one."""
    for name in ("_run_id", "_node_id", "_task_id"):  # set by Flower inside a ServerApp
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)
    sent = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train")
            for node in (11, 22)]
    for msg in sent:  # what Flower's push does
        msg.metadata.__dict__["_message_id"] = msg.object_id
    (tmp_path / FAULTS_FILE).write_text(json.dumps({"22": "node-1 (SuperNode 22) given up on by zk0 local: 401"}))
    strategy = Zk0FedProx(RunRecorder(tmp_path), lambda r: True, faults=tmp_path / FAULTS_FILE, min_train_nodes=2)
    strategy._outbox, strategy._sent = [m.metadata for m in sent], {11, 22}
    with pytest.raises(RunFailed) as failed:
        strategy.aggregate_train(1, [create_message_error_unavailable_res_message(sent[1].metadata, "node_unavail")])
    assert "node 22: error: node-1 (SuperNode 22) given up on by zk0 local: 401" in str(failed.value)
    assert "node 1:" not in str(failed.value)


def _stat(pid: int) -> tuple[int, str]:
    """(parent pid, command name) of a process."""
    data = Path(f"/proc/{pid}/stat").read_text()
    return int(data[data.rindex(")") + 2:].split()[1]), data[data.index("(") + 1:data.rindex(")")]


class Starver(threading.Thread):
    """Hangs one node's ClientApp starts: the node's ClientApp fork server (zk0.deploy.app_forks) is stopped
    (SIGSTOP) as soon as it runs and let go only at the end, so every ClientApp Flower's SuperExec asks for
    stays queued and none ever runs, as when a host is too loaded to start one. A stopped process cannot
    be outrun; a forked ClientApp checks in with its SuperNode within milliseconds of its start."""

    def __init__(self, out: Path, node: str):
        super().__init__(daemon=True)
        self.home = f"FLWR_HOME={out / 'local' / 'flwr-home'}".encode()
        self.name_arg = f'name="{node}"'.encode()
        self.held: set[int] = set()
        self.done = threading.Event()

    def supernode(self) -> int | None:
        for entry in Path("/proc").iterdir():
            try:
                if (entry.name.isdigit() and b"zk0.deploy.node_loop" in (entry / "cmdline").read_bytes()
                        and self.name_arg in (entry / "cmdline").read_bytes()
                        and self.home in (entry / "environ").read_bytes().split(b"\0")):
                    return int(entry.name)
            except OSError:
                continue
        return None

    @staticmethod
    def table() -> dict[int, tuple[int, str]]:
        """{pid: (parent pid, command name)} of every process."""
        found = {}
        for entry in os.scandir("/proc"):
            try:
                if entry.name.isdigit():
                    found[int(entry.name)] = _stat(int(entry.name))
            except (OSError, ValueError):
                continue
        return found

    def run(self) -> None:
        node = None
        while not self.done.wait(0.1):
            if not (node := node or self.supernode()):
                continue
            table = self.table()
            execs = {pid for pid, (parent, name) in table.items() if parent == node and name == "flower-superexe"}
            forks = {pid for pid, (parent, name) in table.items() if parent in execs and name == "zk0-app-forks"}
            for pid in forks - self.held:
                self._signal(pid, signal.SIGSTOP)
                self.held.add(pid)
        for pid in self.held:
            self._signal(pid, signal.SIGCONT)

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _at(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%H:%M:%S")


def test_a_node_whose_clientapp_cannot_start_is_reported_and_given_up_on(demo, tmp_path):
    out = tmp_path / "out"
    env_file = write_env(tmp_path / "starved.env", demo, out, nodes=2, ZK0_NUM_ROUNDS=1, ZK0_LOCAL_STEPS=5,
                         ZK0_EVAL_BATCHES=1, ZK0_MIN_NODES=1, ZK0_ROUND_TIMEOUT=1800, WANDB_MODE="disabled")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    starver = Starver(out, "node-1")
    starver.start()
    try:
        # Minutes on a loaded 2-core host; a run that waits on ZK0_ROUND_TIMEOUT instead is cut off here.
        res = subprocess.run([*ZK0, "local", "--env-file", str(env_file)], env=env, capture_output=True, text=True,
                             timeout=600)
    finally:
        starver.done.set()
        starver.join(timeout=10)
    assert starver.held, "node-1's ClientApp fork server never ran"
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    # zk0 local's own lines: node-1, Flower's reason, within a minute of the message; then the give-up.
    reports = re.findall(r"^(\d\d:\d\d:\d\d) zk0 WARNING: node-1 \(SuperNode (\d+)\): ClientApp for its (\w+) message "
                         r"failed to start \((\d+) s after the message arrived\): (.*)$", res.stderr, re.M)
    assert reports and len(reports) <= MAX_LINES, res.stderr
    assert int(reports[0][3]) < 60
    assert any("no ClientApp process has run for it" in r[4] for r in reports), reports
    (give_up,) = re.findall(r"^(\d\d:\d\d:\d\d) zk0 WARNING: node-1 \(SuperNode (\d+)\): giving up on the node: its "
                            r"ClientApp has failed to start for (\d+) s since its (\w+) message arrived",
                            res.stderr, re.M)
    node_id = reports[0][1]
    assert give_up[1] == node_id and give_up[3] == reports[0][2]
    assert GIVE_UP_AFTER <= int(give_up[2]) <= GIVE_UP_AFTER + 2 * POLL + 1
    # The two lines' clocks agree with the waits they state (modulo a day: the test may span midnight).
    between = (_at(give_up[0]) - _at(reports[0][0])).total_seconds() % 86400
    assert abs(between - (int(give_up[2]) - int(reports[0][3]))) <= 3
    assert "node-0" not in "".join(line for line in res.stderr.splitlines() if "failed to start" in line)

    # The ServerApp's log (streamed to stdout) names the node and why, and the round went on without it.
    named = [line for line in res.stdout.splitlines()
             if f"node {node_id}" in line and "given up on by zk0 local" in line]
    assert named and "node-1" in named[0] and "no ClientApp process has run for it" in named[0], res.stdout[-3000:]
    elapsed = float(re.search(r"finished:completed after ([\d.]+)s", res.stderr).group(1))
    assert elapsed < 1800 / 2, "the run waited on ZK0_ROUND_TIMEOUT"
    history = json.loads((out / "history.json").read_text())
    assert [c["name"] for c in history[1]["clients"].values()] == ["node-0"] and len(history[1]["contributors"]) == 1
    assert json.loads((out / "local" / "node-faults.json").read_text())[node_id].startswith("node-1 (SuperNode")
