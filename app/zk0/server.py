"""The server's work between rounds, independent of Flower: evaluate, checkpoint, record."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .data import eval_batches, open_dataset
from .evaluate import evaluate_policy
from .model import apply_trainable, frozen_fingerprint, load_policy, load_processors, save_checkpoint, trainable_state
from .plots import write_plots
from .publish import Publisher, model_card
from .records import RunRecorder
from .settings import ServerSettings, resolve_device
from .tracking import Tracker

log = logging.getLogger("zk0")


class ServerRuntime:
    """Holds the base policy, the evaluation batches and the run's records."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.out_dir = Path(settings.output_dir)
        device = resolve_device(settings.device)
        self.policy = load_policy(settings.base_policy, device)
        self.preprocessor, self.postprocessor = load_processors(settings.base_policy, device)
        self.fingerprint = frozen_fingerprint(self.policy)
        self.batches = None
        if settings.eval_dataset:
            ds = open_dataset(settings.eval_dataset, self.policy.config)
            self.batches = eval_batches(ds, settings.batch_size, settings.eval_batches)
        self.recorder = RunRecorder(self.out_dir)
        self.tracker = Tracker.open(self.out_dir, settings.wandb_project, settings.model_dump(mode="json"))
        self.publisher = Publisher(settings.hf_repo_id, os.environ.get("HF_TOKEN"), settings.hf_private)
        self.started = time.perf_counter()

    def initial_state(self) -> dict:
        """The base policy's trainable weights: round 0's global model."""
        return trainable_state(self.policy)

    def train_config(self) -> dict:
        """What every node needs to train one round, in Flower's kebab-case."""
        s = self.settings
        return {
            "base-policy": s.base_policy,
            "base-fingerprint": self.fingerprint,
            "local-steps": s.local_steps,
            "total-steps": s.local_steps * s.num_rounds,
            "batch-size": s.batch_size,
            "learning-rate": s.learning_rate,
            "eval-batches": s.eval_batches,
            "seed": s.seed,
        }

    def end_round(self, server_round: int, state: dict) -> dict | None:
        """Evaluate and checkpoint the global model as the settings ask; record the round."""
        apply_trainable(self.policy, state)
        metrics = None
        if self.batches is not None and self.settings.is_eval_round(server_round):
            started = time.perf_counter()
            metrics = evaluate_policy(self.policy, self.preprocessor, self.postprocessor, self.batches, self.settings.seed)
            metrics["eval_seconds"] = time.perf_counter() - started
            log.info("round %d server eval: loss %.4f action MSE %.4f", server_round, metrics["policy_loss"], metrics["action_mse"])
        self.recorder.set(server_round, server_eval=metrics, elapsed_seconds=time.perf_counter() - self.started)
        if self.settings.is_checkpoint_round(server_round):
            path = self.checkpoint(server_round)
            if self.settings.is_push_round(server_round):
                self.publisher.push(server_round, path)
        history = self.history()
        if metrics is not None:
            write_plots(history, self.out_dir)
        self.tracker.log_round(server_round, history[-1])
        return metrics

    def history(self) -> list[dict]:
        """Round records so far, oldest first."""
        return [self.recorder.rounds[r] for r in sorted(self.recorder.rounds)]

    def checkpoint(self, server_round: int) -> Path:
        """Save the global model in LeRobot's format under checkpoints/round-NNN."""
        info = {"round": server_round, "base_policy": self.settings.base_policy, "base_fingerprint": self.fingerprint}
        path = save_checkpoint(
            self.policy, self.preprocessor, self.postprocessor,
            self.out_dir / "checkpoints" / f"round-{server_round:03d}", info,
            extra_files={"README.md": model_card(self.settings, self.history(), server_round)},
        )
        log.info("round %d checkpoint: %s", server_round, path)
        return path
