"""Per-round records: round-NNN.json files and an always-current history.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..files import atomic_write_json

# What describes a node rather than measures it: kept beside its train/eval metrics, not among them.
NODE_FIELDS = ("name", "dataset", "fps", "cameras", "frames")


class RunRecorder:
    """Collects what happens in each round and writes it as soon as a step of the round is complete
    (each set(): the round's replies aggregated, its evaluation done)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.rounds: dict[int, dict] = {}
        self.started = time.perf_counter()  # the run's clock; the runtime restarts it when set-up is done

    def elapsed(self) -> float:
        """Seconds on the run's clock: the records' elapsed_seconds and trained_seconds."""
        return time.perf_counter() - self.started

    def _round(self, server_round: int) -> dict:
        # "complete" turns true once the round's evaluation and (in a checkpoint round) its checkpoint are written:
        # a record that stays false belongs to a round that was cut short.
        return self.rounds.setdefault(
            server_round, {"round": server_round, "complete": False, "server_eval": None, "clients": {}, "bytes": {}}
        )

    def set(self, server_round: int, **fields: Any) -> None:
        """Set top-level fields of a round's record."""
        self._round(server_round).update(fields)
        self.flush(server_round)

    def add_bytes(self, server_round: int, direction: str, count: int) -> None:
        """Count payload bytes sent to or received from nodes."""
        record = self._round(server_round)["bytes"]
        record[direction] = record.get(direction, 0) + int(count)  # written with the round's next set()

    def client(self, server_round: int, node_id: int, kind: str, info: dict) -> None:
        """Record one node's train or eval reply (metrics, name, dataset, status)."""
        clients = self._round(server_round)["clients"]
        entry = clients.setdefault(str(node_id), {"node_id": node_id})
        entry.update({k: v for k, v in info.items() if k in NODE_FIELDS})
        entry[kind] = {k: v for k, v in info.items() if k not in NODE_FIELDS}
        # Written with the round's next set(), which follows every batch of replies: flushing per reply
        # rewrote the files N times a round, a cost quadratic in the number of nodes.

    def truncate(self, last_round: int) -> dict[int, dict]:
        """Forget rounds after `last_round` (no checkpoint holds their model) on disk and in memory; return the
        records forgotten, by round (round files the history lacks included)."""
        files = {int(p.stem.split("-")[1]): p for p in self.out_dir.glob("round-[0-9][0-9][0-9].json")}
        dropped = {r: self.rounds.get(r) or json.loads(files[r].read_text()) for r in sorted({*self.rounds, *files})
                   if r > last_round}
        self.rounds = {r: rec for r, rec in self.rounds.items() if r <= last_round}
        for r in dropped:
            if r in files:
                files[r].unlink()
        atomic_write_json(self.out_dir / "history.json", [self.rounds[r] for r in sorted(self.rounds)])
        return dropped

    def flush(self, server_round: int) -> None:
        """Rewrite this round's file and the history."""
        atomic_write_json(self.out_dir / f"round-{server_round:03d}.json", self.rounds[server_round])
        atomic_write_json(self.out_dir / "history.json", [self.rounds[r] for r in sorted(self.rounds)])
