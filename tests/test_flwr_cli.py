"""zk0.deploy.flwr_cli against a real SuperLink on loopback: the connection file, `flwr run`, run status and the
one retry policy of `zk0 local` and `zk0 submit`. The runs are a stub app's (tests/loopback.py): seconds each."""

from __future__ import annotations

import logging
import os
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w
from loopback import StubFederation, started_runs

from zk0.deploy import flwr_cli
from zk0.deploy.flwr_cli import LOST, Flwr, bin_path, run_status, see_run_through, write_connection
from zk0.deploy.local import free_port


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    with StubFederation(tmp_path_factory.mktemp("flwr-cli")) as federation:
        yield federation


def cli(tmp_path: Path, address: str) -> Flwr:
    home = tmp_path / "flwr-home"
    return Flwr({**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}, write_connection(home, address))


def submitter(flwr: Flwr, link: StubFederation, tmp_path: Path, **config):
    run_config = tmp_path / "run-config.toml"
    run_config.write_text(tomli_w.dumps(config))
    return lambda: flwr.submit(link.app, run_config)


def test_the_connection_file_is_the_one_flwr_reads(link, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ca.crt").write_text("")
    assert write_connection(tmp_path / "tls", "superlink.example.org:8000", Path("ca.crt"), name="lab") == "lab"
    config = tomllib.loads((tmp_path / "tls" / "config.toml").read_text())["superlink"]
    # The CA by absolute path: `flwr` runs with another working directory than the one it was named in.
    assert config == {"default": "lab", "lab": {"address": "superlink.example.org:8000",
                                                "root-certificates": str(tmp_path / "ca.crt")}}
    flwr = cli(tmp_path, link.address)
    listed = flwr("ls", flwr.connection, "--format", "json")
    assert listed.returncode == 0 and "runs" in listed.stdout, listed.stdout + listed.stderr
    assert bin_path("flwr") == str(Path(sys.executable).parent / "flwr") and bin_path("no-such-tool") == "no-such-tool"


def test_status_is_empty_while_the_superlink_cannot_tell(link, tmp_path):
    assert run_status(cli(tmp_path, link.address), "12345") == ""  # no such run
    assert run_status(cli(tmp_path / "dead", f"127.0.0.1:{free_port()}"), "12345") == ""  # nothing listening


def test_a_run_is_followed_to_its_final_status(link, tmp_path):
    link.release()
    flwr = cli(tmp_path, link.address)
    run_id, status = see_run_through(flwr, submitter(flwr, link, tmp_path, **{"num-rounds": 2}), poll=0.2)
    assert status == "finished:completed"
    assert link.config(run_id)["num-rounds"] == 2  # the run config reached the ServerApp


def test_a_run_failed_across_a_lost_superlink_is_resubmitted_at_most_max_retries_times(link, tmp_path, monkeypatch,
                                                                                        caplog):
    monkeypatch.setattr(flwr_cli, "MAX_RETRIES", 1)
    monkeypatch.setattr(logging.getLogger("zk0"), "propagate", True)
    link.release(fail=True)
    flwr, before = cli(tmp_path, link.address), set(started_runs(link.state))
    with caplog.at_level("WARNING", logger="zk0"):
        # Every poll finds the SuperLink lost and back (as `zk0 local` reports a restart): each failed run is
        # submitted again, until the retries are spent.
        run_id, status = see_run_through(flwr, submitter(flwr, link, tmp_path), poll=0.2, watch=lambda: LOST)
    runs = sorted(set(started_runs(link.state)) - before)
    assert status == "finished:failed" and len(runs) == 2 and run_id in runs
    (first,) = set(runs) - {run_id}
    assert f"run {first} failed while the SuperLink was away; submitting again" in caplog.text


def test_a_failed_run_is_final_when_the_superlink_stayed(link, tmp_path):
    link.release(fail=True)
    flwr, before = cli(tmp_path, link.address), set(started_runs(link.state))
    run_id, status = see_run_through(flwr, submitter(flwr, link, tmp_path), poll=0.2)
    assert status == "finished:failed" and set(started_runs(link.state)) - before == {run_id}


def test_a_final_status_from_the_watch_ends_the_wait(link, tmp_path):
    link.hold()  # the run would never end by itself
    flwr = cli(tmp_path, link.address)
    run_id, status = see_run_through(flwr, submitter(flwr, link, tmp_path), poll=0.2,
                                     watch=lambda: "finished:superlink-exited-1")
    assert status == "finished:superlink-exited-1" and run_id
    link.release()
