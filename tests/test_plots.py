"""zk0.server.plots: the PNGs a run leaves for readers without WandB, from histories as runs write them."""

from __future__ import annotations

import struct

from zk0.server import plots
from zk0.server.plots import write_plots


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's header; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_a_history_with_gaps_gives_every_plot(tmp_path, monkeypatch):
    """Rounds without server evaluation, a node that missed a round and a node without held-out
    metrics are skipped in their series, not plotted as zeros or refused."""
    def client(name, train, held=None):
        return {"name": name, "train": {"policy_loss": train}, **({"eval": {"policy_loss": held}} if held else {})}

    history = [
        {"round": 0, "server_eval": {"policy_loss": 2.3, "action_mse": 0.9}, "clients": {}, "bytes": {}},
        {"round": 1, "server_eval": None, "bytes": {"sent": 3 * 2**20, "received": 3 * 2**20},
         "clients": {"1": client("lab-a", 1.9, 2.0), "2": client("lab-b", 2.1)}},
        {"round": 2, "server_eval": {"policy_loss": 1.7, "action_mse": 0.5}, "bytes": {"sent": 2**20},
         "clients": {"1": client("lab-a", 1.6, 1.8)}},
    ]
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)  # keep each figure to read what it shows
    paths = write_plots(history, tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "plots/server_eval.png", "plots/client_loss.png", "plots/bytes.png"]
    assert png_size(paths[0]) == (1000, 400) and png_size(paths[1]) == png_size(paths[2]) == (700, 400)
    server, nodes, payload = figures
    assert [list(line.get_xdata()) for line in server.axes[0].lines] == [[0, 2]]
    assert list(server.axes[1].lines[0].get_ydata()) == [0.9, 0.5]
    lines = {line.get_label(): list(line.get_ydata()) for line in nodes.axes[0].lines}
    assert lines == {"lab-a train": [1.9, 1.6], "lab-a held-out": [2.0, 1.8],
                     "lab-b train": [2.1], "lab-b held-out": []}
    heights = [[bar.get_height() for bar in bars] for bars in payload.axes[0].containers]
    assert heights == [[3.0, 1.0], [3.0]]  # MiB sent, received


def test_a_run_stopped_before_round_1_still_gets_its_plots(tmp_path):
    """Only round 0 evaluated, no node ever replied: empty series, no legend to draw; still three PNGs."""
    paths = write_plots([{"round": 0, "server_eval": {"policy_loss": 2.3, "action_mse": 0.9}, "clients": {}}], tmp_path)
    assert [png_size(p)[1] for p in paths] == [400, 400, 400]


def test_the_plotter_writes_each_history_in_turn_off_the_round_and_finishes_before_the_run_ends(tmp_path):
    history = [{"round": 0, "server_eval": {"policy_loss": 2.3, "action_mse": 0.9}, "clients": {}, "bytes": {}}]
    plotter = plots.Plotter(tmp_path)
    plotter.submit(history)
    history.append({"round": 1, "server_eval": {"policy_loss": 1.9, "action_mse": 0.7}, "clients": {}, "bytes": {}})
    plotter.submit(history)
    plotter.wait()
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert written == ["bytes.png", "client_loss.png", "server_eval.png"]  # no partial file left behind
    assert all(png_size(tmp_path / "plots" / name)[0] > 0 for name in written)
