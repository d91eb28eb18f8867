"""`zk0 bench attack --smoke`: a ×100 update from one lab of four against no defence and the default bounds, one
seed; the table, the JSON, the plot, the records of what the bounds clipped, and nothing left running."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid

import pytest
from federation import marked_processes

MARK = "BENCH_ATTACK_TEST_MARK"


@pytest.fixture(scope="module")
def smoke(demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-attack")
    out, report, mark = tmp / "out", tmp / "result.json", uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZK0_")}
    env[MARK] = mark  # every process below the benchmark carries it
    cmd = [sys.executable, "-m", "zk0.bench.attack", "--smoke", "--demo-dir", str(demo["root"]), "--out", str(out),
           "--json", str(report)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    left = marked_processes(MARK, mark)
    return res, out, json.loads(report.read_text()) if report.exists() else None, left


def test_bench_completes_and_leaves_nothing_running(smoke):
    res, _, result, left = smoke
    assert res.returncode == 0 and result is not None, res.stderr[-3000:]
    assert left == {}


def test_every_run_is_scored(smoke):
    _, _, result, _ = smoke
    runs = {(r["defence"], r["attack"]): r for r in result["runs"]}
    assert sorted(runs) == [("bounded", "clean"), ("bounded", "scale"), ("none", "clean"), ("none", "scale")]
    assert all(math.isfinite(r["loss"]) and "failed" not in r for r in runs.values())


def test_the_bounds_clip_the_hostile_lab_and_only_it(smoke):
    _, _, result, _ = smoke
    runs = {(r["defence"], r["attack"]): r for r in result["runs"]}
    clipped = runs["bounded", "scale"]["clipped"]
    assert sorted(clipped) == ["1", "2"]  # both rounds
    for notes in clipped.values():
        assert list(notes) == ["2"] and "update L2 norm" in notes["2"]  # Flower node 2 is node-1, the hostile lab
    assert runs["none", "scale"]["clipped"] == {} and runs["bounded", "clean"]["clipped"] == {}


def test_the_attack_moves_the_undefended_loss_more(smoke):
    _, _, result, _ = smoke
    moved = result["moved_pct"]
    assert moved["scale|none"]["mean"] > abs(moved["scale|bounded"]["mean"]), moved


def test_table_json_and_plot(smoke):
    res, out, result, _ = smoke
    assert "scale" in res.stdout and "targets:" in res.stdout and "bounded" in res.stdout
    assert [t["target"].split(" ")[0] for t in result["targets"]] == ["scale", "the"]
    assert (out / "attack.png").stat().st_size > 10_000
