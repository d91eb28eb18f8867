"""The demo's logs read well: no line runs past a screen's worth, no warning nobody can act on."""

from __future__ import annotations

MAX_LINE = 1000


def _logs(finished_run) -> dict[str, str]:
    res, out = finished_run
    logs = {path.name: path.read_text(errors="replace") for path in sorted((out / "local" / "logs").glob("*.log"))}
    assert {"superlink.log", "supernode-0.log"} <= set(logs), sorted(logs)
    return {**logs, "zk0 local (stdout)": res.stdout, "zk0 local (stderr)": res.stderr}


def test_no_log_line_runs_past_a_thousand_characters(finished_run):
    long = {name: max(map(len, text.splitlines())) for name, text in _logs(finished_run).items() if text}
    assert all(width <= MAX_LINE for width in long.values()), long
    # The statistics travel beside the config; what Flower logs of the config names them by digest.
    assert "norm-stats-digest" in finished_run[0].stderr + finished_run[0].stdout


def test_no_peft_future_warning_and_a_clean_superlink_shutdown(finished_run):
    logs = _logs(finished_run)
    for name, text in logs.items():
        assert "Support for Transformers < 5.6 is deprecated in PEFT" not in text, name
    assert "SuperExec terminated gracefully" in logs["superlink.log"]
    assert "did not terminate within" not in logs["superlink.log"]
