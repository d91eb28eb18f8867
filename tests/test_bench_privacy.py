"""`zk0 bench privacy --smoke`: one real DP federation (2 nodes, 2 rounds): every update is clipped on its node (the
server receives none above the norm), the accountant's epsilon is in the round records, growing, and in the model
card; the benchmark prints it beside the final server loss."""

from __future__ import annotations

import json
import re

import pytest
from federation import run_zk0
from test_privacy import direct_epsilon

CLIP = 0.05  # the benchmark's default clipping norm, below the demo's round updates


@pytest.fixture(scope="module")
def private_run(demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("privacy")
    out, report = tmp / "out", tmp / "result.json"
    res = run_zk0("bench", "privacy", "--smoke", "--clip-norm", str(CLIP), "--demo-dir", str(demo["root"]),
                  "--out", str(out), "--json", str(report))
    return res, out / "epsilon-10", json.loads(report.read_text()) if report.exists() else None


def test_updates_are_clipped_on_the_node_and_epsilon_is_recorded(private_run):
    res, run, result = private_run
    assert res.returncode == 0, res.stderr[-3000:]
    rounds = [r for r in json.loads((run / "history.json").read_text()) if r["round"] > 0]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        privacy = r["privacy"]
        # As each update arrived, before anything of the server's: never above the norm, and at it (clipped).
        assert len(privacy["update_norms"]) == 2, privacy
        assert all(CLIP * 0.999 <= n <= CLIP for n in privacy["update_norms"].values()), privacy["update_norms"]
        assert r["clipped"] == {}  # the server had nothing to clip
        assert privacy["epsilon"] == pytest.approx(direct_epsilon(privacy["noise_multiplier"], r["round"]), rel=1e-9)
    assert rounds[0]["privacy"]["epsilon"] < rounds[1]["privacy"]["epsilon"] <= 10
    # What the nodes trained was larger than the norm: their own logs (never sent) say so.
    logs = "".join(p.read_text(errors="replace") for p in run.rglob("*.log"))
    raw = [float(x) for x in re.findall(r"update L2 norm ([0-9.e+-]+), clipped to", logs)]
    assert len(raw) >= 4 and min(raw) > CLIP, raw
    card = (run / "checkpoints" / "round-002" / "README.md").read_text()
    assert f"epsilon = {rounds[1]['privacy']['epsilon']:.3g}, delta = 1e-05" in card
    assert result["arms"][0]["epsilon"] == rounds[1]["privacy"]["epsilon"] and "epsilon 10" in res.stdout
