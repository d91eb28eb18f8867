"""`zk0 bench wire|step|aggregate|overhead|demo|cli|gpu` in smoke mode: they run and write sound figures."""

import json
import math
import statistics

import numpy as np
import pytest
import torch

from zk0.bench import perf as bench_perf


def run(capsys, tmp_path, *argv, smoke: bool = True) -> dict:
    out = tmp_path / "figures.json"
    assert bench_perf.main([*argv, *(["--smoke"] if smoke else []), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert "targets:" in printed and result["benchmark"] == argv[0]
    for target in result["targets"]:
        assert math.isfinite(target["value"]) and target["target"] in printed
    return result


def test_wire_counts_what_flower_serializes(capsys, tmp_path):
    result = run(capsys, tmp_path, "wire")
    payloads = result["payloads"]
    per_tensor, delta = "trainable fp16, one array per tensor (before packing)", "trainable int8-delta (up: update)"
    lora = {name for name in payloads if name.startswith("lora ")}
    assert set(payloads) - lora == {"full state dict fp32", "trainable fp32", "trainable fp16", "trainable bf16",
                                    per_tensor, delta}
    assert lora == {f"lora {how} r8 {fmt}" for how in ("fedit", "ffa") for fmt in ("fp32", "fp16", "int8-delta (up)")}
    # Packed, a message is a handful of objects (one Fleet call each); per tensor it was dozens.
    assert payloads["trainable fp16"]["down"]["objects"] <= 8 < 40 < payloads[per_tensor]["down"]["objects"]
    assert 0 < result["params"]["trainable"] < result["params"]["total"]
    for name, p in payloads.items():
        for direction in ("up",) if "int8-delta" in name else ("down", "up"):  # int8-delta sends fp16 down
            fleet, proto = p[direction]["fleet"], p[direction]["proto"]
            # Every value travels once, plus a little framing and metadata; Flower sends identical
            # arrays only once, which a state dict with repeated tensors may benefit from.
            assert 0.9 * p["values_bytes"] < fleet < 1.1 * p["values_bytes"] + 50_000, name
            if name != "full state dict fp32":  # not built for the state dict: it copies the payload several times
                assert p["values_bytes"] < proto < fleet, name
                assert p["values_bytes"] < fleet, name
    assert payloads["trainable fp16"]["values_bytes"] * 2 == payloads["trainable fp32"]["values_bytes"]
    assert payloads["trainable fp32"]["max_abs_error"] == 0
    assert 0 < payloads["trainable fp16"]["max_abs_error"] < payloads["trainable bf16"]["max_abs_error"] < 1e-2
    # int8 updates plus one fp32 scale per 4096 values: just over half of fp16, within about 1% of the update.
    assert 0.5 < payloads[delta]["values_bytes"] / payloads["trainable fp16"]["values_bytes"] < 0.51
    assert payloads[delta]["down"] == payloads["trainable fp16"]["down"]
    assert 0 < result["int8_delta_update_rms_error"] < 0.02
    # LoRA adapters are a small part of the expert; ffa sends only B of fedit's A and B.
    for how in ("fedit", "ffa"):
        assert payloads[f"lora {how} r8 fp16"]["values_bytes"] * 2 == payloads[f"lora {how} r8 fp32"]["values_bytes"]
    ffa, fedit = payloads["lora ffa r8 fp16"]["values_bytes"], payloads["lora fedit r8 fp16"]["values_bytes"]
    assert ffa < fedit < payloads["trainable fp16"]["values_bytes"] / 10


@pytest.mark.slow  # starts ClientApp-like processes and a warm worker (the runtime check in conftest.py saw them)
@pytest.mark.parametrize("model", ["tiny", "full"])  # full --smoke: the file-built architecture, scaled down
def test_step_times_every_arm_in_interleaved_blocks(capsys, tmp_path, demo, model):
    result = run(capsys, tmp_path, "step", "--model", model, "--demo-dir", str(demo["root"]))
    rates, blocks, settings = result["steps_per_s"], result["seconds_per_block"], result["settings"]
    assert set(rates) == set(blocks) == {"plain", "zk0", "zk0_mu0", "zk0_lora", "zk0_cached"}
    assert settings["model"] == model
    for arm, seconds in blocks.items():
        assert len(seconds) == settings["reps"] and all(s > 0 for s in seconds), arm
        assert rates[arm] == pytest.approx(settings["block_steps"] / statistics.median(seconds)), arm
    assert result["ratio"] == pytest.approx(rates["zk0"] / rates["plain"])
    assert result["cached_ratio"] == pytest.approx(rates["zk0_cached"] / rates["plain"])
    cache = result["cache"]  # the cached step's loss is the plain step's; features of 2 slots, 4 bytes per value
    assert cache["loss_rel_diff"] <= 1e-5 and cache["fill_s_per_frame_camera"] > 0
    assert cache["bytes_per_frame_camera"] % 4 == 0
    values = {t["target"]: t["value"] for t in result["targets"]}
    expected = {"zk0 steps/s over plain loop steps/s": rates["zk0"] / rates["plain"],
                "LoRA step (zk0_lora) steps/s over the full-expert step (zk0)": rates["zk0_lora"] / rates["zk0"],
                "zk0 cached-step loss vs the plain step's (relative difference)": cache["loss_rel_diff"]}
    if model == "full":
        expected["zk0 on the feature cache steps/s over plain loop steps/s"] = rates["zk0_cached"] / rates["plain"]
    assert values == pytest.approx(expected)


def test_aggregate_holds_about_one_fp32_copy(capsys, tmp_path):
    result = run(capsys, tmp_path, "aggregate")
    assert result["inputs_copies"] == pytest.approx(2.0)  # four 16-bit updates
    assert result["copy_bytes"] == 4 * result["trainable_params"] > 0
    assert len(result["runs"]) == 4 and "packed replies (as the strategy aggregates)" in result["runs"]
    for name, r in result["runs"].items():
        assert math.isfinite(r["median_s"]) and r["median_s"] > 0, name
        # The fp32 result is one copy; streaming keeps temporaries far below another.
        assert 1.0 <= r["tracemalloc_peak"] / result["copy_bytes"] < 2.0, name


@pytest.mark.slow  # starts ClientApp-like processes and a warm worker (the runtime check in conftest.py saw them)
@pytest.mark.parametrize("model", ["tiny", "full"])  # full --smoke: a saved file-built base policy, scaled down
def test_overhead_phases_add_up_to_the_wall_time(capsys, tmp_path, demo, model):
    result = run(capsys, tmp_path, "overhead", "--model", model, "--demo-dir", str(demo["root"]))
    for mode, loads in (("cold", "import_torch"), ("warm", "apply_weights")):
        phases = result[mode]["phases_s"]
        assert all(math.isfinite(v) and v >= 0 for v in phases.values()), mode
        assert phases["train_compute"] > 0 and phases[loads] > 0, mode
        assert sum(phases.values()) == pytest.approx(result[mode]["wall_s"], rel=0.01), mode
        assert 0 < result[mode]["outside_loop_share"] < result[mode]["outside_optimizer_share"] < 1, mode
        assert result[mode]["runs"][0]["reply_bytes"] > 0
    # The warm message never imports torch: its process does no more than forward the message.
    assert "import_torch" not in result["warm"]["phases_s"] and result["warm"]["cpu_s"] < result["cold"]["cpu_s"]
    assert result["dominant_warm_phase"] in result["warm"]["phases_s"]


def test_demo_splits_every_round_of_a_finished_run(capsys, tmp_path, finished_run):
    # The shared three-round federation stands in for the demo: launching it again would add minutes.
    _, out = finished_run
    result = run(capsys, tmp_path, "demo", "--from-dir", str(out), smoke=False)
    history = json.loads((out / "history.json").read_text())
    # In-train evaluation: the last round's train exchange, then the final model's evaluate message, split apart.
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3, "3 final evaluation"]
    *rounds, final = result["rounds"]
    for r, rec in zip(rounds, history[1:], strict=True):
        end = rec["trained_seconds"] if rec is history[-1] else rec["elapsed_seconds"]
        assert r["wall"] == pytest.approx(end - history[rec["round"] - 1]["elapsed_seconds"])
        assert 0 < r["training"] < r["wall"] and 0 < r["evaluation"] < r["wall"]
        assert r["training"] + r["evaluation"] + r["overhead"] == pytest.approx(r["wall"])
    # Node evaluation is timed on the node, so it counts as evaluation rather than overhead: each round's train
    # messages evaluate the model they receive; the final row holds the last model's node and server evaluations.
    assert final["training"] == 0
    assert final["evaluation"] > history[-1]["server_eval"]["eval_seconds"]
    assert final["wall"] == pytest.approx(history[-1]["elapsed_seconds"] - history[-1]["trained_seconds"])
    assert result["totals_s"]["wall"] == pytest.approx(history[-1]["elapsed_seconds"] - history[0]["elapsed_seconds"])
    assert result["wall_s"] is None  # nothing was launched, so the command's wall time is unknown
    warm = rounds[1:]  # train exchanges after the first, whose nodes load their policy
    share = sum(r["overhead"] for r in warm) / sum(r["wall"] for r in warm)
    assert result["warm_overhead_share"] == pytest.approx(share)


def test_demo_refuses_a_folder_without_a_run(capsys, tmp_path):
    assert bench_perf.main(["demo", "--from-dir", str(tmp_path)]) == 2
    assert "history.json is missing" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_fails_clearly_without_cuda(capsys):
    assert bench_perf.main(["gpu", "--smoke"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_npy_view_reads_what_array_numpy_reads():
    from flwr.app import Array

    from zk0.wire import npy_view

    values = (np.arange(12, dtype=np.int16).reshape(3, 4), np.array(2.5, dtype=np.float16),
              np.asfortranarray(np.eye(3, 5)))
    for value in values:
        array = Array(value)
        view = npy_view(array)
        assert view.dtype == value.dtype and view.shape == value.shape and not view.flags.writeable
        np.testing.assert_array_equal(view, array.numpy())


@pytest.mark.slow  # runs the zk0 command several times
def test_cli_times_help_and_one_refusal_naming_five_mistakes(capsys, tmp_path, demo):
    result = run(capsys, tmp_path, "cli", "--demo-dir", str(demo["root"]), "--out", str(tmp_path / "cli"))
    assert set(result["runs"]) == {"zk0 --help", "zk0 local --help", "zk0 check, env-file with five mistakes",
                                   "zk0 local, env-file with five mistakes"}
    assert all(r["median_s"] > 0 for r in result["runs"].values())
    assert [t["target"] for t in result["targets"]] == ["zk0 --help (s)", "refusal naming five mistakes (s)"]
