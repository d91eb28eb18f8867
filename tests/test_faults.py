"""Faults on a real local federation: a node that dies mid-round and comes back."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import torch
from federation import ZK0, write_env


def _running(pid: int) -> bool:
    """Whether pid is a live process (a zombie has already released its files and ports)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def popen_logged(cmd: list[str], log_path: Path, **kwargs) -> subprocess.Popen:
    """Start `cmd` with stdout and stderr to `log_path` (the child keeps its own copy of the file)."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kwargs)


def superlink_port(out: Path) -> int:
    """The port of the SuperLink that `zk0 local` started for OUTPUT_DIR `out`."""
    config = tomllib.loads((out / "local" / "flwr-home" / "config.toml").read_text())
    return int(config["superlink"]["local"]["address"].rsplit(":", 1)[1])


def supernode_pid(port: int, name: str) -> int | None:
    """The pid of this test's SuperNode called `name` (matched on the SuperLink port it uses)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(args).decode(errors="replace")
        if "zk0.deploy.node_loop" in text and f"127.0.0.1:{port}" in text and f'name="{name}"' in text:
            return int(proc.name)
    return None


def test_killed_node_is_left_out_then_rejoins(demo, tmp_path):
    out = tmp_path / "out"
    env_file = write_env(tmp_path / "faults.env", demo, out, ZK0_MIN_NODES=3, ZK0_LOCAL_STEPS=20)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    run = popen_logged([*ZK0, "local", "--env-file", str(env_file)], tmp_path / "zk0.log", env=env)
    restarted = None
    try:
        log = out / "local" / "logs" / "supernode-2.log"
        wait_until(lambda: log.exists() and "step 5/20" in log.read_text(), 600, "node-2 training round 1")
        pid = supernode_pid(superlink_port(out), "node-2")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        node_env = dict(line.split(b"=", 1) for line in environ if b"=" in line)
        os.killpg(pid, signal.SIGKILL)  # the robot host loses power: the node and its app process
        # Only once the process has ended are its ports free again (an exit can take seconds under load).
        wait_until(lambda: not _running(pid), 60, "the killed SuperNode to end")
        # The host comes back and starts the same SuperNode again.
        restarted = popen_logged(cmdline, tmp_path / "node-2-again.log", env=node_env, start_new_session=True)
        assert run.wait(timeout=900) == 0, (tmp_path / "zk0.log").read_text()[-3000:]
    finally:
        for proc in (run, restarted):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL) if proc is restarted else proc.kill()
    history = json.loads((out / "history.json").read_text())
    names = {r["round"]: sorted(c["name"] for c in r["clients"].values() if "train" in c) for r in history}
    assert len(history[1]["contributors"]) == 3 and "node-2" not in names[1]
    for r in (2, 3):
        assert len(history[r]["contributors"]) == 4 and names[r] == [f"node-{i}" for i in range(4)]
    assert (out / "checkpoints" / "round-003" / "model.safetensors").is_file()


def find_pid(*needles: str) -> int | None:
    """The pid of the process whose command line holds every needle (this test's own processes)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                text = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if all(n in text for n in needles):
                return int(proc.name)
    return None


def serverapp_pid(port: int) -> int | None:
    """The pid of the ServerApp process serving this test's SuperLink."""
    return find_pid("flwr-serverapp", f"127.0.0.1:{port} ")


def _kill_serverapp_in_round_2(env_file: Path, env: dict[str, str], out: Path, log_path: Path) -> None:
    """Run the experiment and SIGKILL its ServerApp once round 2 has started; the run must report failure."""
    first = popen_logged([*ZK0, "local", "--env-file", str(env_file)], log_path, env=env)
    try:
        wait_until(lambda: (out / "round-002.json").exists(), 600, "round 2 to start")
        port = superlink_port(out)
        os.kill(wait_until(lambda: serverapp_pid(port), 60, "the ServerApp process"), signal.SIGKILL)
        assert first.wait(timeout=300) != 0  # the run is reported failed, not completed
    finally:
        if first.poll() is None:
            first.kill()


def _one_wandb_run(out: Path, run_id: str, done: int, history: list[dict]) -> dict:
    """Check the WandB run across the restart; the resumed run's rows by step."""
    from wandb_reader import read_offline_run

    # One WandB run across the restart, with every round. The killed ServerApp's WandB service died with it
    # before writing what it was sent, so the resumed server logs the finished rounds again (in offline
    # mode its run starts at step 0; a resumed online run skips the steps it holds).
    assert (out / "wandb-run-id.txt").read_text().strip() == run_id
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert [sorted(p.name for p in r.glob("run-*.wandb")) for r in runs] == [[f"run-{run_id}.wandb"]] * 2
    (before, _), (after, exit_code) = (read_offline_run(r / f"run-{run_id}.wandb") for r in runs)
    assert set(before) <= set(range(done + 1)) and sorted(after) == [0, 1, 2, 3] and exit_code == 0
    for step, row in [*before.items(), *after.items()]:
        assert row["server/policy_loss"] == history[step]["server_eval"]["policy_loss"], step
    return after


def test_killed_serverapp_resumes_without_losing_a_round(demo, finished_run, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    env_file = write_env(tmp_path / "resume.env", demo, out)  # the same experiment as `finished_run`
    # No WANDB_RUN_ID: the restarted ServerApp must find the run's id in OUTPUT_DIR by itself.
    lines = env_file.read_text().splitlines(True)
    env_file.write_text("".join(line for line in lines if not line.startswith("WANDB_RUN_ID=")))
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_RUN_ID")}
    _kill_serverapp_in_round_2(env_file, env, out, tmp_path / "first.log")
    # What the killed run left: the restart must take up after its newest checkpoint (round 1 at least).
    done = max(int(p.name.removeprefix("round-")) for p in (out / "checkpoints").glob("round-*"))
    run_id = (out / "wandb-run-id.txt").read_text().strip()
    second = subprocess.run([*ZK0, "local", "--env-file", str(env_file)], env=env, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    output = second.stdout + second.stderr  # ServerApp lines come through `flwr log`
    resumed_from = out / "checkpoints" / f"round-{done:03d}"
    assert done >= 1 and f"resuming after round {done} of 3 (checkpoint {resumed_from})" in output
    assert "no checkpoint in" not in output
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2, 3]
    assert all(len(r["contributors"]) == 4 for r in history[1:])
    after = _one_wandb_run(out, run_id, done, history)
    # Every model's node evaluations, the checkpointed one's by the resumed run's first train message, in the
    # records and at their WandB step, as the uninterrupted run's.
    _, reference_out = finished_run
    reference_history = json.loads((reference_out / "history.json").read_text())
    for step, (record, reference_record) in enumerate(zip(history, reference_history, strict=True)):
        losses = {c["name"]: c["eval"]["policy_loss"] for c in record["clients"].values()}
        expected = {c["name"]: c["eval"]["policy_loss"] for c in reference_record["clients"].values()}
        assert losses == pytest.approx(expected, rel=1e-3) and len(losses) == 4, step
        assert after[step]["client_node-0/eval/policy_loss"] == losses["node-0"], step
    # Same seeds, same rounds: the final model matches the uninterrupted run's.
    resumed = load_file(out / "checkpoints" / "round-003" / "model.safetensors")
    reference = load_file(reference_out / "checkpoints" / "round-003" / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-4, atol=1e-5)


def superlink_pid(port: int) -> int | None:
    """The pid of this test's SuperLink."""
    return find_pid("flower-superlink", f"--port {port} ")


def test_restarted_superlink_keeps_the_experiment_going(demo, tmp_path):
    out = tmp_path / "out"
    env_file = write_env(tmp_path / "superlink.env", demo, out, nodes=2, ZK0_NUM_ROUNDS=2, ZK0_LOCAL_STEPS=8,
                         ZK0_MIN_NODES=2, ZK0_EVAL_BATCHES=1, WANDB_MODE="disabled")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    run = popen_logged([*ZK0, "local", "--env-file", str(env_file)], tmp_path / "zk0.log", env=env)
    try:
        # Round 1 is checkpointed and round 2 under way when the SuperLink's host goes down.
        checkpoint = out / "checkpoints" / "round-001" / "model.safetensors"
        wait_until(checkpoint.is_file, 600, "round 1 checkpoint")
        os.kill(superlink_pid(superlink_port(out)), signal.SIGKILL)
        assert run.wait(timeout=900) == 0, (tmp_path / "zk0.log").read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
    log = (tmp_path / "zk0.log").read_text()
    assert "SuperLink exited with code -9; starting it again" in log
    assert f"resuming after round 1 of 2 (checkpoint {out / 'checkpoints' / 'round-001'})" in log
    first, second = re.findall(r"run (\d+) submitted", log)
    # zk0 local never restarts SuperNodes: the same processes retried, reconnected and took the new run.
    for i in range(2):
        node_log = (out / "local" / "logs" / f"supernode-{i}.log").read_text()
        # Whether a node logs a failed connection attempt depends on when it polled during the outage;
        # that one SuperNode process served both runs does not.
        assert node_log.count("Starting Flower SuperNode") == 1, node_log[-3000:]
        assert f"[RUN {first}]" in node_log and f"[RUN {second}]" in node_log, node_log[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2]
    assert all(len(r["contributors"]) == 2 for r in history[1:])
    assert (out / "checkpoints" / "round-002" / "model.safetensors").is_file()
