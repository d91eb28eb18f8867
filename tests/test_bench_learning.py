"""`zk0 bench learning --smoke`: every arm trains, every evaluation set is scored, the plot is written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from zk0.bench_learning import COLUMNS, NODES

ARMS = ["fedprox", "fedavg", "fedprox-lora", "fedprox-lora-ffa", *(f"local-{n}" for n in NODES), "local-mean", "centralized"]


@pytest.fixture(scope="module")
def smoke(demo, tmp_path_factory):
    """One smoke benchmark (2 rounds x 2 steps), shared by the assertions below."""
    tmp = tmp_path_factory.mktemp("bench")
    out, report = tmp / "out", tmp / "result.json"
    # A process of its own: the benchmark sets torch's thread count, which must not leak into other
    # tests; and no ZK0_ variable from the shell (this fixture runs before the autouse one clears them).
    args = ["--smoke", "--demo-dir", str(demo["root"]), "--out", str(out), "--json", str(report)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZK0_")}
    cmd = [sys.executable, "-m", "zk0.bench_learning", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    result = json.loads(report.read_text()) if report.exists() else None
    return res, out, result, res.stdout


def test_bench_completes(smoke):
    res, _, result, _ = smoke
    assert res.returncode == 0 and result is not None, res.stderr[-3000:]


def test_every_arm_is_scored_on_every_set(smoke):
    _, _, result, _ = smoke
    assert sorted(result["results"]) == sorted(ARMS)
    for arm in ARMS:
        assert sorted(result["results"][arm]) == sorted(COLUMNS)  # the JSON is written with sorted keys
        for column, metrics in result["results"][arm].items():
            assert metrics["num-samples"] > 0, (arm, column)
            assert all(math.isfinite(metrics[m]) for m in ("policy_loss", "action_mse")), (arm, column)


def test_every_model_takes_the_same_optimizer_steps(smoke):
    _, _, result, _ = smoke
    steps = result["optimizer_steps_per_model"]
    assert steps["fedprox"] == steps["fedavg"] == steps["fedprox-lora"] == steps["fedprox-lora-ffa"] == steps["local-only"] == [4, 4, 4, 4]
    assert steps["centralized"] == 4


def test_bench_reproduces_the_federation_split_and_metrics(smoke):
    # Our evaluation of the final global model must match what the nodes and the server measured
    # (up to the 16-bit wire format); a different held-out split or other batches would be far off.
    _, _, result, _ = smoke
    assert all(gap < 1e-2 for gap in result["reproduction_gap"].values()), result["reproduction_gap"]


def test_fedavg_runs_without_the_proximal_term(smoke):
    _, out, _, _ = smoke
    for arm, want_prox in (("fedprox", True), ("fedavg", False)):
        history = json.loads((out / arm / "history.json").read_text())
        prox = [c["train"]["proximal_loss"] for r in history[1:] for c in r["clients"].values()]
        assert len(prox) == 8 and all((p > 0) == want_prox for p in prox), (arm, prox)


def test_every_arm_moved_away_from_the_base_model(smoke):
    _, _, result, _ = smoke
    base = result["server_eval_history"]["fedprox"][0]["policy_loss"]
    assert [r["round"] for r in result["server_eval_history"]["fedavg"]] == [0, 1, 2]
    for arm in ARMS:
        assert result["results"][arm]["server-eval"]["policy_loss"] != pytest.approx(base, rel=1e-6), arm


def test_table_and_targets_are_printed(smoke):
    _, _, result, stdout = smoke
    lines = stdout.splitlines()
    for arm in ARMS:
        assert sum(line.split()[:1] == [arm] for line in lines) == 2, arm  # one row per metric table
    verdicts = [line for line in lines if line.strip().startswith(("PASS ", "MISS "))]
    assert len(verdicts) == len(result["targets"]) == 16  # (a) per arm, (b), (c), (d) per LoRA arm; two metrics
    assert sorted({t["target"][:3] for t in result["targets"]}) == ["(a)", "(b)", "(c)", "(d)"]


def test_lora_arms_exchange_only_adapters(smoke):
    _, out, result, _ = smoke
    received = {}
    for arm in ("fedprox", "fedprox-lora", "fedprox-lora-ffa"):
        history = json.loads((out / arm / "history.json").read_text())
        received[arm] = history[1]["bytes"]["received"]
        ckpt = out / arm / "checkpoints" / "round-002"
        assert (ckpt / "adapter" / "adapter_model.safetensors").is_file() == (arm != "fedprox"), arm
    # FFA sends B only: about half of FedIT's A and B, both far below the full expert.
    assert received["fedprox-lora-ffa"] < 0.6 * received["fedprox-lora"] < 0.6 * 0.1 * received["fedprox"]
    assert result["arms"]["fedprox-lora"]["learning_rate"] == 10 * result["arms"]["fedprox"]["learning_rate"]


def test_plot_is_a_png(smoke):
    _, out, _, _ = smoke
    assert (out / "server-eval.png").read_bytes().startswith(b"\x89PNG")
