"""One run per output folder: a second `zk0 local` or ServerApp is refused at once; its own ServerApp runs under
`zk0 local`'s lock; a resubmitted ServerApp waits for its predecessor; a dead holder's lock is taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from federation import run_zk0, write_env

from zk0.errors import OutputInUse
from zk0.run_lock import LOCK_NAME, SERVERAPP, hold_for_serverapp, lock_run, release_run
from zk0.server.runtime import ServerRuntime
from zk0.settings import ServerSettings

# Takes the lock with the helper `zk0 local` uses, says so, then holds it until killed.
HOLD = ("import sys, time; from zk0.run_lock import lock_run; lock_run(sys.argv[1], *sys.argv[2:]); "
        "print('held', flush=True); time.sleep(600)")


def test_a_second_run_on_the_same_output_folder_is_refused_at_once_and_a_dead_holder_is_taken_over(
    demo, tmp_path, caplog
):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        res = run_zk0("local", "--env-file", str(write_env(tmp_path / "demo.env", demo, out)), timeout=60)
        took = time.monotonic() - started
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert res.returncode == 2, res.stderr
    assert f"is in use by another `zk0 local` (PID {holder.pid}: " in res.stderr, res.stderr
    assert "zk0.run_lock" in res.stderr  # the holder's command line
    assert f"kill {holder.pid}" in res.stderr and "set ZK0_OUTPUT_DIR to another folder" in res.stderr
    assert not (out / "local").exists()  # refused before any SuperLink or SuperNode started
    assert took < 10, took  # the CLI's start and the preflight (under 1 s on an idle host); no federation

    # The holder died without releasing: its file still names it, and the next run takes the lock over.
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="zk0"):
        fd = lock_run(out)
    assert f"names PID {holder.pid}" in caplog.text and "taking it over" in caplog.text
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    release_run(fd)
    assert (out / LOCK_NAME).read_text() == ""  # a clean end leaves nothing to take over
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zk0"):
        release_run(lock_run(out))
    assert "taking it over" not in caplog.text


def hold(out, *role_and_experiment: str) -> subprocess.Popen:
    """Another process holding the folder's lock (as `zk0 local` by default) until killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), *role_and_experiment], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_serverapp_on_a_folder_another_run_holds_is_refused_before_any_work(demo, tmp_path):
    """Compose's and `zk0 submit`'s runs: the ServerApp is what writes the folder, so it takes the lock."""
    out = tmp_path / "out"
    settings = ServerSettings.load(base_policy=str(demo["base-policy"]), output_dir=out, device="cpu")
    holder = hold(out)
    try:
        started = time.monotonic()
        with pytest.raises(OutputInUse) as refused:
            ServerRuntime(settings)
        took = time.monotonic() - started
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert f"ZK0_OUTPUT_DIR={out} is in use by another `zk0 local` (PID {holder.pid}: " in str(refused.value)
    assert "zk0.run_lock" in str(refused.value) and f"kill {holder.pid}" in str(refused.value)
    assert took < 1, took  # before the policy is loaded
    assert not (out / "history.json").exists()


# A ServerApp started below the holder, as `zk0 local`'s is (SuperLink, SuperExec, ServerApp).
BELOW = ("import subprocess, sys; from zk0.run_lock import lock_run; lock_run(sys.argv[1]); "
         "child = 'import sys; from zk0.run_lock import hold_for_serverapp; "
         "print(hold_for_serverapp(sys.argv[1], \\'e1\\', timeout=5))'; "
         "sys.exit(subprocess.run([sys.executable, '-c', child, sys.argv[1]]).returncode)")


def test_zk0_locals_own_serverapp_runs_under_its_lock_and_a_resubmitted_one_waits_for_its_predecessor(tmp_path):
    out = tmp_path / "out"
    below = subprocess.run([sys.executable, "-c", BELOW, str(out)], capture_output=True, text=True, timeout=60)
    assert below.returncode == 0 and below.stdout.strip() == "None", below.stdout + below.stderr

    holder = hold(out, SERVERAPP, "e1")  # a ServerApp of experiment e1 still finishing
    took = []
    try:
        started = time.monotonic()
        with pytest.raises(OutputInUse, match=f"another ServerApp \\(PID {holder.pid}: "):
            hold_for_serverapp(out, "e2")  # another experiment: at once
        with pytest.raises(OutputInUse, match="previous ServerApp has not ended for 1 s"):
            hold_for_serverapp(out, "e1", timeout=1)  # the same one: waits
        took.append(time.monotonic() - started)
        got = []
        waiter = threading.Thread(target=lambda: got.append(hold_for_serverapp(out, "e1", timeout=60)), daemon=True)
        waiter.start()
        time.sleep(1.5)
        assert not got  # still waiting while the predecessor lives
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    waiter.join(timeout=30)
    assert got and isinstance(got[0], int), "the resubmitted ServerApp never took the folder"
    assert 1 <= took[0] < 3
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    release_run(got[0])
