"""Many virtual labs through Flower's simulation runtime: `zk0 local --simulation N` and `zk0 bench scale`."""

import json
import math
import os
import subprocess
import uuid
from pathlib import Path

from federation import marked_processes, run_zk0, write_env

from zk0.bench import perf as bench_perf

# Set for the run under test and inherited by every process below it (Ray's daemons included): the test
# looks only at its own run's processes, so it passes while another federation runs on this host.
# Not a ZK0_ name: zk0 refuses unknown ZK0_ variables.
MARK = "SIMULATION_TEST_MARK"


def _alive(mark: str, *names: str) -> list[str]:
    """Command lines of this run's live processes whose program is one of `names` (Ray's and Flower's daemons)."""
    found = []
    for argv in marked_processes(MARK, mark).values():
        if any(Path(a).name in names for a in argv[:2] if a):
            found.append(" ".join(argv))
    return found


def test_only_the_runs_own_processes_are_looked_at():
    """A process of another run, of the same name, is not this run's leftover; one carrying the mark is."""
    mark = uuid.uuid4().hex
    named = ["bash", "-c", "exec -a flower-superlink sleep 60"]
    ours = subprocess.Popen(named, env={**os.environ, MARK: mark})
    other = subprocess.Popen(named, env={**os.environ, MARK: "another-run"})
    try:
        for _ in range(50):  # until exec has replaced bash's command line
            if found := _alive(mark, "flower-superlink"):
                break
            subprocess.run(["sleep", "0.1"], check=True)
        assert found == ["flower-superlink 60"]
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()
    assert not _alive(mark, "flower-superlink")


def test_simulation_problems_are_refused_together_before_anything_starts(demo, tmp_path):
    out = tmp_path / "out"
    env_file = write_env(tmp_path / "sim.env", demo, out, ZK0_MIN_NODES=6)
    res = run_zk0("local", "--env-file", str(env_file), "--simulation", "4", "--tls", str(tmp_path))
    assert res.returncode != 0
    assert "ZK0_MIN_NODES=6 exceeds --simulation 4" in res.stderr, res.stderr
    assert "--tls with --simulation" in res.stderr, res.stderr
    assert not (out / "local").exists()


def test_simulation_without_ray_is_refused_with_what_to_install(monkeypatch):
    import importlib.util

    import pytest

    from zk0.deploy.local import check_simulation
    from zk0.settings import ServerSettings, SettingsError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(SettingsError, match=r"pip install 'flwr\[simulation\]==1.42.0'"):
        check_simulation(4, ServerSettings.load(min_nodes=2), None)


def test_bench_scale_smoke_runs_virtual_labs_and_fits_each_cost(capsys, tmp_path, demo, monkeypatch):
    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)
    out = tmp_path / "scale"
    figures = tmp_path / "figures.json"
    assert bench_perf.main(["scale", "--smoke", "--demo-dir", str(demo["root"]), "--out", str(out),
                            "--json", str(figures)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(figures.read_text())
    assert [r["nodes"] for r in result["runs"]] == [4, 8] and "log-log slope" in printed
    # The 8-node run: every virtual node trained every round, on the env-file's node k mod 4, with batches of its own.
    history = json.loads((out / "n008" / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2]
    for record in history[1:]:
        clients = {c["name"]: c for c in record["clients"].values()}
        assert sorted(clients) == [f"sim-{k:03d}" for k in range(8)]
        for k in range(8):
            assert Path(clients[f"sim-{k:03d}"]["dataset"]).name == f"node-{k % 4}"
        assert clients["sim-000"]["train"]["loss"] != clients["sim-004"]["train"]["loss"]
        assert record["aggregate_seconds"] > 0 and record["server_peak_rss_mib"] > 0
        # fp16 down and up to 8 nodes; the final model down again to the 8 nodes evaluating it (ZK0_EVAL_MODE=in-train:
        # earlier models are evaluated in the next round's train message, round 0's included).
        sent = record["bytes"]["sent"]
        assert record["bytes"]["received"] == sent == record["bytes"].get("sent_eval", sent) > 0
    assert [("sent_eval" in r["bytes"], len([c for c in r["clients"].values() if "eval" in c])) for r in history] == [
        (False, 8), (False, 8), (True, 8)]
    for run in result["runs"]:
        assert run["db_bytes_end"] > 0 and run["records_bytes"] > 0 and run["round_wall_s"] > 0
    # Payload per round is linear in N by construction: the fit must say so.
    assert math.isclose(result["slopes"]["payload bytes through the SuperLink per round"], 1.0, abs_tol=0.01)
    assert all(math.isfinite(s) for s in result["slopes"].values())
    assert Path(result["plot"]).is_file()
    # Nothing the simulation started outlives it: Ray's daemons and Flower's processes are gone.
    assert not (left := _alive(mark, "raylet", "gcs_server", "flower-superlink", "flwr-simulation")), left
