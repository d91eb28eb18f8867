"""The aggregation scale benchmark: it measures the strategy's real weighted mean, and fits slopes on log-log axes."""

from __future__ import annotations

import numpy as np
import pytest

from zk0.bench.scale_agg import aggregation_costs, fit_slope, loglog_plot
from zk0.wire import PACKED


def test_costs_are_measured_on_the_strategy_s_weighted_mean_of_every_reply(tmp_path):
    errors = {}

    def check(replies, aggregated):
        # Independent of zk0.wire: Flower's own decoding of each reply and a float64 numpy average.
        weights = [r.content["metrics"]["num-samples"] for r in replies]
        assert len(set(weights)) == len(replies)  # unequal weights, or a plain mean would pass too
        updates = np.stack([r.content["arrays"][PACKED].numpy().astype(np.float64) for r in replies])
        expected = np.average(updates, axis=0, weights=weights)
        merged = np.concatenate([aggregated[k].numpy().reshape(-1) for k in sorted(aggregated)])  # packing order
        assert merged.dtype == np.float32 and merged.shape == expected.shape
        errors[len(replies)] = float(np.abs(merged - expected).max())

    runs = aggregation_costs([4, 8], full=False, fmt="fp16", repeats=1, check=check)

    assert errors.keys() == {4, 8} and max(errors.values()) < 1e-6
    assert [r["nodes"] for r in runs] == [4, 8]
    for r in runs:
        assert r["median_s"] > 0 and r["min_s"] <= r["median_s"] and len(r["seconds"]) == 1
        assert r["update_bytes"] == r["copy_bytes"] // 2  # fp16 values: half an fp32 copy per reply
        assert r["inputs_bytes"] == r["nodes"] * r["update_bytes"] == r["inputs_resident_bytes"]  # tiny: not shared
        assert r["above_inputs_bytes"] >= r["tracemalloc_peak"] > 0
        assert r["total_peak_bytes"] == r["inputs_bytes"] + r["above_inputs_bytes"]
        assert r["median_cpu_s"] > 0
    png = loglog_plot(tmp_path / "scale.png", {"time": ([4, 8], [r["median_s"] for r in runs])}, "smoke")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_slope_is_the_exponent_of_a_power_law():
    xs = [1, 2, 4, 16, 64]
    assert fit_slope(xs, xs) == pytest.approx(1.0)
    assert fit_slope(xs, [x**2 for x in xs]) == pytest.approx(2.0)
    assert fit_slope(xs, [3.0 * x**0.5 for x in xs]) == pytest.approx(0.5)
