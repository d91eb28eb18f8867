"""Read an offline WandB run's records back, to check what zk0 logged."""

from __future__ import annotations

import json
from pathlib import Path


def read_offline_run(run_file: Path) -> tuple[dict[int, dict], int | None]:
    """History rows by step, and the exit code (None when the run never finished)."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal.datastore import DataStore

    store = DataStore()
    store.open_for_scan(str(run_file))
    history: dict[int, dict] = {}
    exit_code = None
    while (data := store.scan_data()) is not None:
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[int(row["_step"])] = row
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return history, exit_code
