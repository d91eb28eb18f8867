"""One `zk0 local` per output folder: a second one is refused at once; a dead holder's lock is taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

from federation import run_zk0, write_env

from zk0.deploy.run_lock import LOCK_NAME, lock_run, release_run

# Takes the lock with the helper `zk0 local` uses, says so, then holds it until killed.
HOLD = ("import sys, time; from zk0.deploy.run_lock import lock_run; lock_run(sys.argv[1]); "
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
    assert "zk0.deploy.run_lock" in res.stderr  # the holder's command line
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
