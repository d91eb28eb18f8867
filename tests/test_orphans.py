"""Nothing outlives `zk0 local` or `zk0 supernode`, whatever kills them; a killed run resumes where it stopped."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from federation import ZK0, write_env

# Every process below the command under test inherits this variable: it finds them however deep they
# are and whoever adopted them. Not a ZK0_ name: zk0 refuses unknown ZK0_ variables.
MARK = "ORPHAN_TEST_MARK"


def started_by(mark: str) -> dict[int, str]:
    """Live processes whose environment carries MARK=mark: {pid: command line}."""
    needle = f"{MARK}={mark}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            # A zombie's environment reads empty: only live processes are found.
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def running(mark: str, name: str) -> list[int]:
    """Those of them whose command line names `name`."""
    return [pid for pid, cmd in started_by(mark).items() if name in cmd]


def listeners() -> dict[str, int]:
    """{socket inode: port} of every TCP socket listening on this host."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                found[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    return found


def ports_of(pids) -> set[int]:
    """TCP ports these processes listen on."""
    inodes = set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        inodes |= {link[8:-1] for link in links if link.startswith("socket:[")}
    return {port for inode, port in listeners().items() if inode in inodes}


def wait_until(check, timeout: float, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return bool(check())


def end_leftovers(mark: str) -> None:
    """Kill what a failed test left behind, so it does not load the rest of the suite."""
    for pid in started_by(mark):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def popen_logged(cmd: list[str], log_path: Path, **kwargs) -> subprocess.Popen:
    """Start `cmd` with stdout and stderr to `log_path` (the child keeps its own copy of the file)."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def newest_checkpoint(out: Path) -> int:
    done = [p for p in (out / "checkpoints").glob("round-[0-9][0-9][0-9]") if (p / "zk0.json").is_file()]
    return max(int(p.name.removeprefix("round-")) for p in done)


def train_messages(node_log: Path) -> int:
    """How many train messages' ClientApps a node's log says have started."""
    text = node_log.read_text(errors="replace") if node_log.is_file() else ""
    return text.count("ClientApp started for the train message")


def test_kill_9_of_zk0_local_leaves_nothing_and_the_rerun_resumes(demo, tmp_path):
    from zk0.node import warm

    out = tmp_path / "out"
    env_file = write_env(tmp_path / "demo.env", demo, out, nodes=1, ZK0_NUM_ROUNDS=2, ZK0_LOCAL_STEPS=20,
                         ZK0_MIN_NODES=1, ZK0_EVAL_BATCHES=1, WANDB_MODE="disabled")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    cmd = [*ZK0, "local", "--env-file", str(env_file)]
    first, mark = tmp_path / "first.log", uuid.uuid4().hex
    run = popen_logged(cmd, first, env={**env, MARK: mark}, start_new_session=True)
    try:
        # Killed in round 2: after round 1's checkpoint, once the node's ClientApp for round 2 has started
        # (a round takes a second or two: a fixed wait would let the run finish).
        node_log = out / "local" / "logs" / "supernode-0.log"
        started = wait_until(lambda: train_messages(node_log) >= 2 or run.poll() is not None, 600, every=0.05)
        assert started, first.read_text()[-3000:]
        assert run.poll() is None and (out / "checkpoints" / "round-001" / "zk0.json").is_file(), first.read_text()
        procs = started_by(mark)
        ports = ports_of(procs)
        # The whole process group, as an OOM killer, a closed terminal or a crashed shell would; not reaped
        # until the end, as by a parent slow to notice: watching the parent's pid alone would miss it.
        os.killpg(run.pid, signal.SIGKILL)
        ended = wait_until(lambda: not started_by(mark), 10)
        left = started_by(mark)
    finally:
        run.kill()
        run.wait()
        end_leftovers(mark)
    commands = " ".join(procs.values())
    for name in ("flower-superlink", "zk0.deploy.node_loop", "zk0.deploy.exec_loop", "app_forks.py", "flwr-serverapp",
                 "zk0.node.warm"):
        assert name in commands, f"no {name} was running when zk0 local was killed"
    assert ended, f"outlived zk0 local: {left}"
    assert len(ports) >= 2 and not ports & set(listeners().values()), ports  # the SuperLink's and the SuperNode's
    assert f"no checkpoint in {out}: starting at round 1" in first.read_text()

    done, again = newest_checkpoint(out), uuid.uuid4().hex
    res = subprocess.run(cmd, env={**env, MARK: again}, capture_output=True, text=True, timeout=900)
    output = res.stdout + res.stderr
    assert res.returncode == 0, output[-3000:]
    assert f"resuming after round {done} of 2" in output and "round 2 of 2 done" in output, output[-3000:]
    assert [r["round"] for r in json.loads((out / "history.json").read_text())] == [0, 1, 2]
    # A normal end leaves nothing either, and the killed nodes' worker sockets, keys and locks are gone.
    assert wait_until(lambda: not started_by(again), 10), started_by(again)
    killed = {str(pid) for pid, cmd in procs.items() if "app_forks.py" in cmd}
    assert not [p.name for p in warm.worker_dir().iterdir() if p.name.split("-")[0] in killed]


def test_sigterm_stops_zk0_local_in_order_and_leaves_nothing(demo, tmp_path):
    out = tmp_path / "out"
    env_file = write_env(tmp_path / "demo.env", demo, out, nodes=1, ZK0_MIN_NODES=1, WANDB_MODE="disabled")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    log, mark = tmp_path / "zk0.log", uuid.uuid4().hex
    run = popen_logged([*ZK0, "local", "--env-file", str(env_file)], log, env={**env, MARK: mark},
                       start_new_session=True)
    try:
        started = wait_until(lambda: running(mark, "flwr-serverapp") or run.poll() is not None, 600, every=0.5)
        assert started, log.read_text()[-3000:]
        run.send_signal(signal.SIGTERM)  # zk0 local alone, as `kill` or a service manager would
        code = run.wait(timeout=60)
        ended = wait_until(lambda: not started_by(mark), 10)
    finally:
        run.kill()
        run.wait()
        end_leftovers(mark)
    assert code == 128 + signal.SIGTERM and ended, started_by(mark)
    # Stopped in order, not by its parent-death signal: the node said goodbye to the SuperLink.
    assert "SuperNode terminated gracefully" in (out / "local" / "logs" / "supernode-0.log").read_text()


def test_kill_9_of_zk0_supernode_ends_its_superexec_and_warm_worker(demo, tmp_path, monkeypatch):
    from zk0.node import warm

    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)  # the warm worker started below inherits it too
    node_env = {**os.environ, "ZK0_DATASET": str(demo["datasets"]["node-0"]), "ZK0_CAMERAS": demo["cameras"]["node-0"]}
    with socket.socket() as superlink:
        # Stands in for the SuperLink: `zk0 supernode` only checks that it accepts; Flower then keeps retrying.
        superlink.bind(("127.0.0.1", 0))
        superlink.listen()
        # The fast loop, whose SuperExec, fork server and warm worker are zk0's to end.
        node = popen_logged([*ZK0, "supernode", "--fast-loop", "--superlink", f"127.0.0.1:{superlink.getsockname()[1]}",
                             "--port", str(free_port())], tmp_path / "node.log", env=node_env, start_new_session=True)
        try:
            started = wait_until(lambda: running(mark, "app_forks.py"), 300, every=0.5)
            assert started, (tmp_path / "node.log").read_text()[-3000:]
            # What the node's first ClientApp does: start the warm worker that belongs to its parent, the fork server.
            with warm.connect(running(mark, "app_forks.py")[0]):
                pass
            procs = started_by(mark)
            ports = ports_of(procs)
            os.kill(node.pid, signal.SIGKILL)  # `zk0 supernode`, the parent of its SuperNode; reaped only at the end
            ended = wait_until(lambda: not started_by(mark), 10)
            left = started_by(mark)
        finally:
            node.kill()
            node.wait()
            end_leftovers(mark)
    commands = " ".join(procs.values())
    for name in ("zk0.deploy.node_loop", "zk0.deploy.exec_loop", "app_forks.py", "zk0.node.warm", "zk0.deploy.procs"):
        assert name in commands, f"no {name} was running when the node was killed"
    assert ended, f"outlived the node: {left}"
    assert ports and not ports & set(listeners().values()), ports  # the SuperNode's runtime API


def test_zk0_supernode_runs_flowers_own_programs_by_default_and_kill_9_ends_them(demo, tmp_path, monkeypatch):
    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)
    node_env = {**os.environ, "ZK0_DATASET": str(demo["datasets"]["node-0"]), "ZK0_CAMERAS": demo["cameras"]["node-0"]}
    log = tmp_path / "node.log"
    with socket.socket() as superlink:  # stands in for the SuperLink, as above
        superlink.bind(("127.0.0.1", 0))
        superlink.listen()
        node = popen_logged([*ZK0, "supernode", "--superlink", f"127.0.0.1:{superlink.getsockname()[1]}",
                             "--port", str(free_port())], log, env=node_env, start_new_session=True)
        try:
            assert wait_until(lambda: running(mark, "flower-superexec"), 300, every=0.5), log.read_text()[-3000:]
            procs = started_by(mark)
            os.kill(node.pid, signal.SIGKILL)
            ended = wait_until(lambda: not started_by(mark), 10)
        finally:
            node.kill()
            node.wait()
            end_leftovers(mark)
    assert "SuperNode: Flower's own loop" in log.read_text()
    # Flower's own console scripts, with nothing of zk0's loop between them and Flower: `zk0 supernode` runs
    # flower-supernode as its child (to watch its ClientApps start) rather than becoming it.
    assert any("/flower-supernode --superlink" in cmd for pid, cmd in procs.items() if pid != node.pid), procs
    assert not [cmd for cmd in procs.values() if "zk0.deploy." in cmd and "zk0.deploy.procs" not in cmd], procs
    assert ended, f"outlived the node: {started_by(mark)}"
