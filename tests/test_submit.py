"""`zk0 submit` as the Compose `submit` service runs it: a real SuperLink on loopback whose runs are a
stub app's (tests/loopback.py), so each run takes seconds; the exit codes are the CLI's own."""

from __future__ import annotations

import os
import subprocess

import pytest
from federation import ZK0
from loopback import StubFederation, started_runs

from zk0.deploy.local import free_port


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    with StubFederation(tmp_path_factory.mktemp("submit")) as federation:
        yield federation


def submit(cwd, address: str, *args: str, home=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"HOME": str(home)} if home else {})}
    return subprocess.run([*ZK0, "submit", "--superlink", address, "--connect-wait", "0.2", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_experiment_runs_with_its_settings_as_run_config_and_exit_0(link, tmp_path):
    link.release()
    home = tmp_path / "home"
    (home / "policy").mkdir(parents=True)
    env_file = tmp_path / "experiment.env"
    # A node line as in a shared env-file: `zk0 submit` leaves nodes to their hosts and does not check them.
    env_file.write_text("ZK0_BASE_POLICY=~/policy\nZK0_PROXIMAL_MU=0.25\nZK0_NUM_ROUNDS=2\nZK0_OUTPUT_DIR=out\n"
                        "ZK0_NODE_0_DATASET=/on/a/robot/host\n")
    before = set(started_runs(link.state))
    res = submit(tmp_path, link.address, "--env-file", str(env_file), "--app", str(link.app), home=home)
    assert res.returncode == 0, res.stderr[-3000:]
    (run_id,) = set(started_runs(link.state)) - before
    assert f"run {run_id}: finished:completed" in res.stderr and "without TLS" in res.stderr
    config = link.config(run_id)
    assert (config["proximal-mu"], config["num-rounds"]) == (0.25, 2)
    # The ServerApp runs in another working directory (and maybe as another user): local paths arrive absolute.
    assert config["base-policy"] == str(home / "policy") and config["output-dir"] == str(tmp_path / "out")


def test_a_failed_run_exits_1(link, tmp_path, monkeypatch):
    from zk0.deploy.submit import submit_and_wait

    monkeypatch.chdir(tmp_path)
    link.release(fail=True)
    before = set(started_runs(link.state))
    # In this process, polling faster than the command's 3 s: `zk0 submit` exits with what this returns.
    assert submit_and_wait(link.address, app_dir=link.app, tries=1, poll=0.2) == 1
    assert len(set(started_runs(link.state)) - before) == 1  # a failure with the SuperLink up is final


def test_an_unreachable_superlink_exits_3_naming_it(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    res = submit(tmp_path, address, "--connect-tries", "2")
    assert res.returncode == 3
    assert f"SuperLink {address} is not reachable after 2 tries" in res.stderr and "firewalls" in res.stderr


def test_every_bad_setting_is_refused_at_once_before_the_superlink_is_tried(tmp_path):
    env_file = tmp_path / "bad.env"
    env_file.write_text("ZK0_NUM_ROUNDS=0\nZK0_PROXIMAL_MUU=0.1\n")
    res = submit(tmp_path, f"127.0.0.1:{free_port()}", "--env-file", str(env_file), "--connect-tries", "1")
    assert res.returncode == 2 and "2 problem(s)" in res.stderr and "not reachable" not in res.stderr, res.stderr
    assert "[bad.env:1 (ZK0_NUM_ROUNDS)]" in res.stderr
    assert "[bad.env:2 (ZK0_PROXIMAL_MUU)] unknown variable" in res.stderr
