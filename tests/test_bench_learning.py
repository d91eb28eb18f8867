"""`zk0 bench learning --smoke`: every arm trains over two seeds, every evaluation set is scored, the personal
models stay on the nodes and load with plain LeRobot, the tables carry mean ± std, the plot is written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.factory import make_pre_post_processors
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

from zk0.bench.learning import COLUMNS, NODES, personal_dirs

FEDERATED = ["fedprox", "fedadam"]
OWN_ONLY = ["personalised", "local-own"]  # scored on each node's own held-out set (and their union) only
ARMS = [*FEDERATED, *OWN_ONLY, *(f"local-{n}" for n in NODES), "local-mean", "centralized"]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def smoke(demo, tmp_path_factory):
    """One smoke benchmark (2 seeds x 2 rounds x 2 steps), shared by the assertions below."""
    tmp = tmp_path_factory.mktemp("bench")
    out, report = tmp / "out", tmp / "result.json"
    # A process of its own: the benchmark sets torch's thread count, which must not leak into other
    # tests; and no ZK0_ variable from the shell (this fixture runs before the autouse one clears them).
    args = ["--smoke", "--seeds", "2", "--arms", ",".join(FEDERATED), "--demo-dir", str(demo["root"]),
            "--out", str(out), "--json", str(report)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZK0_")}
    cmd = [sys.executable, "-m", "zk0.bench.learning", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    result = json.loads(report.read_text()) if report.exists() else None
    return res, out, result, res.stdout


def test_bench_completes(smoke):
    res, _, result, _ = smoke
    assert res.returncode == 0 and result is not None, res.stderr[-3000:]


def test_every_arm_is_scored_on_every_set_for_every_seed(smoke):
    _, _, result, _ = smoke
    assert result["seed_values"] == SEEDS and [s["seed"] for s in result["seeds"]] == SEEDS
    for seed in result["seeds"]:
        assert sorted(seed["results"]) == sorted(ARMS)
        for arm, row in seed["results"].items():
            want = [*NODES, "union-heldout"] if arm in OWN_ONLY else COLUMNS
            assert sorted(row) == sorted(want), arm  # the JSON is written with sorted keys
            for column, metrics in row.items():
                assert metrics["num-samples"] > 0, (arm, column)
                assert all(math.isfinite(metrics[m]) for m in ("policy_loss", "action_mse")), (arm, column)


def test_summary_is_mean_and_std_of_the_seeds(smoke):
    _, _, result, _ = smoke
    for arm in ARMS:
        for column, metrics in result["summary"][arm].items():
            cell = metrics["policy_loss"]
            values = [s["results"][arm][column]["policy_loss"] for s in result["seeds"]]
            assert cell["values"] == values and cell["mean"] == pytest.approx(sum(values) / 2)
            assert cell["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2)), (arm, column)
    assert {c["arm"] for c in result["comparisons"]} == {"fedadam"}
    assert all(c["verdict"] in ("better", "worse", "within noise") for c in result["comparisons"])


def test_every_model_takes_the_same_optimizer_steps(smoke):
    _, _, result, _ = smoke
    for seed in result["seeds"]:
        steps = seed["optimizer_steps_per_model"]
        assert steps["fedprox"] == steps["fedadam"] == steps["local-only"] == [4, 4, 4, 4]
        assert steps["centralized"] == 4


def test_bench_reproduces_the_federation_split_and_metrics(smoke):
    # Our evaluation of the final global model must match what the nodes and the server measured
    # (up to the 16-bit wire format); a different held-out split or other batches would be far off.
    _, _, result, _ = smoke
    gaps = [g for s in result["seeds"] for g in s["reproduction_gap"].values()]
    assert len(gaps) == 4 and all(gap < 1e-2 for gap in gaps), gaps


def test_every_round_records_its_mu_and_every_arm_moved_away_from_the_base_model(smoke):
    _, _, result, _ = smoke
    for seed in result["seeds"]:
        assert seed["proximal_mu_per_round"] == {"fedprox": [0.01, 0.01], "fedadam": [0.01, 0.01]}
        base = seed["server_eval_history"]["fedprox"][0]["policy_loss"]
        assert [r["round"] for r in seed["server_eval_history"]["fedadam"]] == [0, 1, 2]
        for arm in [*FEDERATED, "centralized"]:
            assert seed["results"][arm]["server-eval"]["policy_loss"] != pytest.approx(base, rel=1e-6), arm


def test_personal_models_stay_on_the_nodes_and_load_with_plain_lerobot(smoke):
    _, out, result, _ = smoke
    for seed in SEEDS:
        server = out / f"seed-{seed}" / "fedprox"
        for name, folder in personal_dirs(server).items():
            path = folder / "round-002"
            config = PreTrainedConfig.from_pretrained(str(path))
            SmolVLAPolicy.from_pretrained(str(path), config=config)
            make_pre_post_processors(config, pretrained_path=str(path))
            reported = result["seeds"][seed]["results"]["personalised"][name]["policy_loss"]
            info = json.loads((path / "zk0.json").read_text())
            assert info["heldout"]["personal"]["policy_loss"] == reported
            # What the node kept, chosen on validation episodes from its training episodes, never its held-out ones.
            choice = result["seeds"][seed]["personal_choices"][name]
            assert info["kept"] == ("personal" if choice["kept"] else "global")
            assert choice["steps"] in ((1, 2) if choice["kept"] else (0,)) and info["chosen_steps"] == choice["steps"]
            assert info["validation_episodes"] and not set(info["validation_episodes"]) & set(info["heldout_episodes"])
        # Only metrics reached the server: no weights besides its own checkpoints in its folder or records.
        weights = [p for p in server.rglob("*.safetensors") if "checkpoints" not in p.parts]
        assert not weights and "personal" not in (server / "checkpoints" / "round-002" / "zk0.json").read_text()
        history = json.loads((server / "history.json").read_text())
        personal = [c["name"] for c in history[-1]["clients"].values() if "personal_policy_loss" in c.get("eval", {})]
        assert sorted(personal) == NODES
        for client in history[-1]["clients"].values():  # a node that kept the global model reports its figures
            ev = client["eval"]
            assert ev["personal_kept"] or ev["personal_policy_loss"] == ev["policy_loss"]


def test_table_and_targets_are_printed(smoke):
    _, _, result, stdout = smoke
    lines = stdout.splitlines()
    for arm in ARMS:
        assert sum(line.split()[:1] == [arm] and "±" in line for line in lines) == 2, arm  # a row per metric table
    # The rows and each table's title, and a line per node of what its personalisation kept.
    assert sum("±" in line for line in lines) == 2 * (len(ARMS) + 1) + len(NODES)
    verdicts = [line for line in lines if line.strip().startswith(("PASS ", "MISS "))]
    # (a) per arm, (b), (c), and (e) personalised against local-only and global per node; two metrics.
    assert len(verdicts) == len(result["targets"]) == 2 * (2 + 1 + 1 + 2 * len(NODES))
    assert sorted({t["target"][:3] for t in result["targets"]}) == ["(a)", "(b)", "(c)", "(e)"]


def test_plot_is_a_png(smoke):
    _, out, _, _ = smoke
    assert (out / "server-eval.png").read_bytes().startswith(b"\x89PNG")


# One federated arm's run, as `zk0 bench learning` starts it, long enough to be stopped mid-run.
ONE_ARM = """
import sys
from pathlib import Path
from zk0.bench.learning_arms import arm_settings, demo_assets, run_federated
from zk0.settings import ServerSettings
demo = demo_assets(Path(sys.argv[1]))
s = ServerSettings.load(num_rounds=50, local_steps=2, min_nodes=4, base_policy=str(demo["base-policy"]),
                        eval_dataset=str(demo["datasets"]["server-eval"]), eval_cameras=demo["cameras"]["server-eval"])
run_federated("fedprox", arm_settings(s, "fedprox", Path(sys.argv[2])), demo, 600)
"""


def test_a_bench_stopped_mid_run_stops_its_zk0_local_and_everything_below(demo, tmp_path):
    import signal
    import time
    import uuid

    from federation import marked_processes

    mark = uuid.uuid4().hex  # inherited by every process below the benchmark, however deep
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ZK0_")}, "BENCH_TEST_MARK": mark}
    bench = subprocess.Popen([sys.executable, "-c", ONE_ARM, str(demo["root"]), str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "fedprox" / "local" / "logs" / "superlink.log").exists():  # past the preflight
            assert bench.poll() is None and time.monotonic() < deadline, "the run never started"
            time.sleep(0.2)
        ours = marked_processes("BENCH_TEST_MARK", mark)
        local = [pid for pid, argv in ours.items() if argv[2:4] == ["zk0.cli", "local"]]
        assert len(local) == 1, ours
        bench.send_signal(signal.SIGTERM)  # no handler: the benchmark dies at once, as a service manager's stop
        bench.wait(timeout=10)
        deadline = time.monotonic() + 60
        while (left := marked_processes("BENCH_TEST_MARK", mark)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, left  # zk0 local, its SuperLink, SuperNodes and everything they started
    finally:
        bench.kill()
        bench.wait()
        for pid in marked_processes("BENCH_TEST_MARK", mark):
            os.kill(pid, signal.SIGKILL)
