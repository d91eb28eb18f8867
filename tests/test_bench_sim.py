"""`zk0 bench learning --sim`'s tables: success per model and lab, own-task rows, rank agreement, targets."""

from __future__ import annotations

import math

import pytest

from zk0.bench.learning_report import NODES, PERSONAL, UNION
from zk0.bench.learning_sim import ALL, OWN, loss_vs_success, seed_table, spearman, summarise, targets
from zk0.labs import LABS

LABS4 = list(LABS.values())


def _sim(rates: list[float]) -> dict:
    out = {lab.name: {"success_rate": r} for lab, r in zip(LABS4, rates, strict=True)}
    out[ALL] = {"success_rate": sum(rates) / len(rates)}
    return out


def _rows(fed: list[float], central: list[float], local: list[list[float]]) -> dict:
    rows = {"fedprox": {"sim": _sim(fed), UNION: {"policy_loss": 1.0, "action_mse": 10.0}},
            "centralized": {"sim": _sim(central), UNION: {"policy_loss": 0.5, "action_mse": 5.0}}}
    for i, rates in enumerate(local):
        rows[f"local-{NODES[i]}"] = {"sim": _sim(rates), UNION: {"policy_loss": 2.0 + i, "action_mse": 20.0 + i}}
    rows["local-mean"] = {UNION: {"policy_loss": 3.5, "action_mse": 21.5}}  # offline only, as the benchmark has it
    rows["local-own"] = {UNION: {"policy_loss": 1.5, "action_mse": 15.0}}  # own held-out sets only: no pooled success
    return rows


def test_seed_table_rows_and_own_task():
    local = [[0.8, 0.0, 0.0, 0.2], [0.0, 0.6, 0.0, 0.0], [0.0, 0.0, 0.4, 0.0], [0.2, 0.0, 0.0, 1.0]]
    personal = {n: {"success_rate": r} for n, r in zip(NODES, [1.0, 0.8, 0.6, 1.0], strict=True)}
    table = seed_table(_rows([0.6, 0.4, 0.2, 0.8], [0.8, 0.6, 0.4, 1.0], local), personal, LABS4)
    assert table["local-own"][OWN] == pytest.approx((0.8 + 0.6 + 0.4 + 1.0) / 4)
    assert table["local-mean"]["lift-top"] == pytest.approx(0.25) and table["local-mean"][ALL] == pytest.approx(0.2)
    assert table[PERSONAL]["node-2"] == 0.6 and table["fedprox"][OWN] == pytest.approx(0.5)


def test_spearman_and_rank_agreement():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    local = [[0.1] * 4, [0.0] * 4, [0.0] * 4, [0.0] * 4]
    rows = _rows([0.5] * 4, [0.9] * 4, local)
    agreement = loss_vs_success(rows, seed_table(rows, None, LABS4))
    assert agreement["models"] == 7 and agreement["policy_loss"] > 0.8  # lower loss, more success here


def test_targets_need_a_margin_beyond_the_seeds_spread():
    tables = []
    for shift in (0.0, 0.1):
        local = [[0.1 + shift] * 4] * 4
        tables.append(seed_table(_rows([0.3 + shift] * 4, [0.5 + shift] * 4, local), None, LABS4))
    found = {t["target"]: t["passed"] for t in targets(summarise(tables), ["fedprox"])}
    assert found["centralized >= 30% on lift-top"]
    assert found["federated >= mean local-only on all tasks, beyond the spread"]  # 0.35 vs 0.15, std 0.07
    close = [seed_table(_rows([0.1 + s] * 4, [0.1] * 4, [[0.1] * 4] * 4), None, LABS4) for s in (0.0, 0.1)]
    found = {t["target"]: t["passed"] for t in targets(summarise(close), ["fedprox"])}
    assert not found["federated >= mean local-only on all tasks, beyond the spread"]
    assert not found["centralized >= 30% on lift-top"]


def test_report_prints_every_model_and_target():
    from zk0.bench.learning_sim import loss_vs_success, report, result

    local = [[0.8, 0.0, 0.0, 0.2], [0.0, 0.6, 0.0, 0.0], [0.0, 0.0, 0.4, 0.0], [0.2, 0.0, 0.0, 1.0]]
    personal = {n: {"success_rate": 0.5} for n in NODES[:3]}  # node-3 kept no personal model
    rows = _rows([0.6, 0.4, 0.2, 0.8], [0.8, 0.6, 0.4, 1.0], local)
    tables = [seed_table(rows, personal, LABS4)] * 2
    text = report(result(tables, [loss_vs_success(rows, tables[0])] * 2, ["fedprox"], LABS4, 5, 12.0))
    for needle in ("centralized", "local-own", PERSONAL, "Spearman", "node-2: personalised", "lift-up"):
        assert needle in text
    assert "node-3: personalised" not in text
