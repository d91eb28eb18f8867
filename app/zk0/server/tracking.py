"""One WandB run per experiment: server metrics and every node's metrics, by round."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("zk0")
RUN_ID_FILE = "wandb-run-id.txt"
# Never logged: anything that looks like a credential.
SECRET_MARKERS = ("token", "key", "secret", "password")


def round_metrics(record: dict) -> dict[str, float]:
    """Flatten a round record into WandB keys: server/…, clients/…, client_<name>/…, bytes/…."""
    out: dict[str, float] = {}
    for key, value in (record.get("server_eval") or {}).items():
        out[f"server/{key}"] = value
    for kind in ("train", "eval"):
        for key, value in (record.get(f"{kind}_aggregate") or {}).items():
            out[f"clients/{kind}/{key}"] = value
    for client in record.get("clients", {}).values():
        name = client.get("name") or client["node_id"]
        for kind in ("train", "eval"):
            for key, value in (client.get(kind) or {}).items():
                out[f"client_{name}/{kind}/{key}"] = value
    for lab, result in (record.get("sim_eval") or {}).items():
        for key, value in result.items():
            out[f"sim/{lab}/{key}"] = value
    for key, value in record.get("bytes", {}).items():
        out[f"bytes/{key}"] = value
    for key in ("epsilon", "round_epsilon", "noise_std"):  # ZK0_DP: what the round spent (zk0.server.privacy)
        if key in (record.get("privacy") or {}):
            out[f"privacy/{key}"] = record["privacy"][key]
    if "contributors" in record:
        out["clients/contributors"] = len(record["contributors"])
    return {k: float(v) for k, v in out.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def public_config(config: dict[str, Any]) -> dict[str, Any]:
    """Settings without secrets, for the run's config."""
    return {k: v for k, v in config.items() if not any(m in k.lower() for m in SECRET_MARKERS)}


class Tracker:
    """A WandB run, or nothing when tracking is off; never stops training."""

    def __init__(self, run=None):
        self.run = run

    @classmethod
    def open(cls, out_dir: Path, project: str, config: dict[str, Any]) -> Tracker:
        """Start or resume the experiment's run; skip with one log line when WandB is not set up."""
        mode = os.environ.get("WANDB_MODE", "").lower()
        if mode == "disabled":
            log.info("WandB: disabled (WANDB_MODE=disabled)")
            return cls()
        if not mode and not os.environ.get("WANDB_API_KEY"):
            log.info("WandB: skipped; set WANDB_API_KEY to track online or WANDB_MODE=offline to log locally")
            return cls()
        run_id = cls._run_id(Path(out_dir))
        try:
            import wandb

            run = wandb.init(
                project=project, id=run_id, resume="allow", dir=str(out_dir),
                config=public_config(config), mode=mode or None, reinit="finish_previous",
            )
        except Exception as err:  # noqa: BLE001 - tracking must never take the experiment down; the error is logged
            log.warning("WandB: could not start the run (%s); continuing without tracking", err)
            return cls()
        log.info("WandB: run %s (%s mode) in project %s", run_id, mode or "online", project)
        return cls(run)

    @staticmethod
    def _run_id(out_dir: Path) -> str:
        """WANDB_RUN_ID, else the id this experiment used before, else a new one (saved)."""
        path = out_dir / RUN_ID_FILE
        run_id = os.environ.get("WANDB_RUN_ID") or (path.read_text().strip() if path.is_file() else "")
        run_id = run_id or uuid.uuid4().hex[:12]
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
        return run_id

    def log_round(self, server_round: int, record: dict) -> None:
        """Log one round's metrics at step=round."""
        if self.run is None:
            return
        try:
            self.run.log(round_metrics(record), step=server_round)
        except Exception as err:  # noqa: BLE001 - as above: logged, and the experiment goes on
            log.warning("WandB: logging round %d failed (%s)", server_round, err)

    def log_videos(self, server_round: int, paths: list[Path]) -> None:
        """Simulated episodes as WandB videos, under sim/video/<file name>."""
        if self.run is None or not paths:
            return
        try:
            import wandb

            self.run.log({f"sim/video/{p.stem}": wandb.Video(str(p), format="mp4") for p in paths}, step=server_round)
        except Exception as err:  # noqa: BLE001 - as above
            log.warning("WandB: logging round %d's videos failed (%s)", server_round, err)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (marked failed when exit_code is not 0)."""
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
