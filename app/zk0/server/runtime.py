"""The server's work between rounds, independent of Flower: evaluate, checkpoint, record."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from safetensors.torch import load_file

from ..data import check_opened, eval_batches, open_dataset
from ..errors import RunFailed
from ..evaluate import evaluate_policy
from ..features import precompute
from ..lora import Adapter, load_adapter
from ..model import (
    apply_trainable,
    frozen_fingerprint,
    latest_checkpoint,
    load_policy,
    load_processors,
    save_checkpoint,
    trainable_names,
    trainable_state,
)
from ..portable import describe
from ..run_lock import hold_for_serverapp
from ..settings import ServerSettings, SettingsError, resolve_device
from ..stats import DIGEST_KEY, digest, from_json, merge_stats, to_json
from .plots import Plotter
from .publish import Publisher, model_card
from .records import RunRecorder, atomic_write_json
from .simulated import SimScorer
from .tracking import Tracker

log = logging.getLogger("zk0")
# Settings that define an experiment: a restart with the same ones resumes it.
EXPERIMENT_FIELDS = {
    "num_rounds", "local_steps", "batch_size", "learning_rate", "proximal_mu", "base_policy", "eval_dataset", "seed",
    "stats", "trainable", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_aggregation",
    "strategy", "server_learning_rate", "server_momentum", "server_beta_1", "server_beta_2", "server_tau",
    "adaptive_mu", "adaptive_mu_step", "adaptive_mu_patience", "adaptive_mu_max",
    "max_node_share", "norm_bound_factor", "aggregation", "trim_fraction", "byzantine_nodes", "multikrum_select",
    "dp", "dp_clip_norm", "dp_noise_multiplier", "dp_target_epsilon", "dp_delta",  # a resumed run's ledger goes on
}
STATS_FILE = "norm-stats.json"
FRAMES_FILE = "node-frames.json"  # training frames each node counted in its statistics, by node name


_LOCKS: dict[Path, object] = {}


def experiment_digest(settings: ServerSettings) -> str:
    """What tells a ServerApp resubmitted for this run's settings from another run on the same folder."""
    return hashlib.sha256(json.dumps(settings.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def lock_output(out_dir: Path, timeout: float = 300.0):
    """Hold OUTPUT_DIR/.lock while this process lives, so two ServerApps never write one experiment.

    After a SuperLink restart the previous ServerApp may still be finishing a checkpoint: the
    resubmitted one waits for it to exit (the kernel drops the lock with the process). Under `zk0 local`,
    which holds the run's lock (zk0.run_lock) for all its ServerApps, this lock is what orders them.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = (out_dir / ".lock").resolve()
    if path in _LOCKS:
        return _LOCKS[path]
    handle = open(path, "w")  # noqa: SIM115 - held for the process's lifetime
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _LOCKS[path] = handle
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise SettingsError(
                    f"{out_dir} is in use by another ServerApp for more than {timeout:.0f}s: stop it, "
                    "or set ZK0_OUTPUT_DIR to another folder"
                ) from None
            time.sleep(1)


class ServerRuntime:
    """Holds the base policy, the evaluation batches and the run's records."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.out_dir = Path(settings.output_dir)
        # Before any work: a run that another one's folder refuses is refused at once (zk0.run_lock).
        self.run_lock = hold_for_serverapp(self.out_dir, experiment_digest(settings))
        self.lock = lock_output(self.out_dir)
        self.device = resolve_device(settings.device)
        self.adapter = Adapter.from_settings(settings)
        self.policy = load_policy(settings.base_policy, self.device, self.adapter, settings.seed)
        self.fingerprint = frozen_fingerprint(self.policy)
        self.batches = None
        if settings.eval_dataset:
            # Refused here, before round 0, with every problem named: never a traceback mid-run.
            check_opened(settings.eval_dataset, self.policy.config, settings.eval_cameras, role="eval",
                         setting="ZK0_EVAL_DATASET", cameras_setting="ZK0_EVAL_CAMERAS")
            ds = open_dataset(settings.eval_dataset, self.policy.config, cache_dir=settings.cache_dir)
            self.batches = eval_batches(ds, settings.batch_size, settings.eval_batches)
            if settings.eval_feature_cache:  # decoded once already; the frozen encoder then runs once too
                self.batches = precompute(self.policy, ds, settings.eval_cameras, self.batches)
        self.sim = SimScorer.maybe(settings, self.out_dir)
        self.stats = ""  # merged normalisation statistics (JSON); "" while the base policy's are used
        frames = self.out_dir / FRAMES_FILE
        self.node_frames: dict[str, int] = json.loads(frames.read_text()) if frames.is_file() else {}
        saved = self.out_dir / STATS_FILE
        if settings.stats == "federated" and saved.is_file():
            self.stats = to_json(from_json(saved.read_text()))  # a restarted server keeps the statistics it merged
            log.info("normalisation statistics from %s (merged before round 1)", saved)
        self.use_stats(self.stats)
        self.recorder = RunRecorder(self.out_dir)
        self.plotter = Plotter(self.out_dir)
        self.start_round = self._resume()
        self.tracker = Tracker.open(self.out_dir, settings.wandb_project, settings.model_dump(mode="json"))
        if self.start_round:
            self._track_finished_rounds()
        self.publisher = Publisher(settings.hf_repo_id, os.environ.get("HF_TOKEN"), settings.hf_private)
        self.recorder.started = time.perf_counter()

    def _track_finished_rounds(self) -> None:
        """Log the rounds before the checkpoint again: a ServerApp killed mid-run takes its WandB service down
        before that service has written what it was sent. Rounds the resumed WandB run already holds are skipped."""
        try:
            held = self.tracker.run.step if self.tracker.run is not None else 0  # the step WandB expects next
        except Exception as err:  # noqa: BLE001  tracking must never stop the experiment
            log.warning("WandB: could not read the resumed run's step (%s); not logging earlier rounds again", err)
            return
        for record in self.history():
            if record["round"] >= held:
                self.tracker.log_round(record["round"], record)

    def use_stats(self, stats: str) -> None:
        """Processors with `stats` (JSON; "" = the base policy's): the checkpoints' without a camera map, the
        evaluation's with the evaluation set's."""
        values = from_json(stats) if stats else None
        self.preprocessor, self.postprocessor = load_processors(self.settings.base_policy, self.device, stats=values)
        rename = self.settings.eval_cameras
        self.eval_preprocessor = self.preprocessor
        if rename:
            self.eval_preprocessor = load_processors(self.settings.base_policy, self.device, rename, values)[0]
        self.stats = stats

    def merge_node_stats(self, replies: list[tuple[str, str | None, str]]) -> None:
        """Merge the nodes' statistics (name, JSON or None, why not) into the run's; fail with reasons when too few."""
        usable = [(name, text) for name, text, _ in replies if text]
        if len(usable) < self.settings.min_nodes:
            reasons = "; ".join(f"{name}: {why}" for name, text, why in replies if not text) or "no node replied"
            raise RunFailed(
                f"normalisation statistics came from {len(usable)} node(s), "
                f"ZK0_MIN_NODES={self.settings.min_nodes} are required: {reasons}"
            )
        # By name: merged in the order replies arrived, the statistics would differ run to run in their last bits.
        parts = {name: from_json(text) for name, text in sorted(usable)}
        # What each lab said it trains on: the round records show it beside a claim of more samples than a round uses.
        # In place: the strategy's limits hold this dict.
        self.node_frames.update({name: int(p["action"]["count"][0]) for name, p in parts.items() if "action" in p})
        atomic_write_json(self.out_dir / FRAMES_FILE, self.node_frames)
        merged = to_json(merge_stats(list(parts.values())))
        atomic_write_json(self.out_dir / STATS_FILE, json.loads(merged))
        log.info("normalisation statistics merged from %s", ", ".join(name for name, _ in usable))
        self.use_stats(merged)

    def initial_state(self) -> dict:
        """The global model to start from: the base policy's, or the newest checkpoint's when resuming."""
        return trainable_state(self.policy)

    def _resume(self) -> int:
        """Continue an interrupted experiment from its newest checkpoint; return that round (0 if fresh)."""
        self._check_identity()
        ckpt = latest_checkpoint(self.out_dir / "checkpoints")
        server_round = json.loads((ckpt / "zk0.json").read_text())["round"] if ckpt else 0
        saved_history = self.out_dir / "history.json"
        history = json.loads(saved_history.read_text()) if saved_history.is_file() else []
        # Records past the checkpoint belong to rounds no checkpoint holds: they run again. Without a
        # checkpoint every round does, round 0's evaluation included.
        self.recorder.rounds = {r["round"]: r for r in history}
        for r, record in self.recorder.truncate(server_round if ckpt else -1).items():
            log.info("round %d's record discarded: %s; it runs again", r, self._why_discarded(r, record, ckpt))
        if ckpt is None:
            log.info("no checkpoint in %s: starting at round 1", self.out_dir)
            return 0
        if self.adapter.lora:  # the checkpoint's model.safetensors is merged; the adapter itself is beside it
            load_adapter(self.policy, ckpt)
        else:
            weights = load_file(ckpt / "model.safetensors")
            apply_trainable(self.policy, {name: weights[name] for name in trainable_names(self.policy)})
        if server_round in self.recorder.rounds:  # cut short after its checkpoint: nothing of it is missing
            self.recorder.set(server_round, complete=True)
        log.info("resuming after round %d of %d (checkpoint %s)", server_round, self.settings.num_rounds, ckpt)
        return server_round

    def _check_identity(self) -> None:
        """Refuse an output folder that holds another experiment; note this one's settings there."""
        identity = self.settings.model_dump(mode="json", include=EXPERIMENT_FIELDS)
        saved = self.out_dir / "experiment.json"
        before = json.loads(saved.read_text()) if saved.is_file() else {}
        # A setting the saved file lacks (one added by a later zk0) counts as unchanged.
        if changed := sorted(k for k in identity if before.get(k, identity[k]) != identity[k]):
            raise SettingsError(
                f"{self.out_dir} holds another experiment (different {', '.join(changed)}): "
                "set ZK0_OUTPUT_DIR to a new folder, or restore the settings to resume it"
            )
        atomic_write_json(saved, identity)

    def _why_discarded(self, server_round: int, record: dict, ckpt: Path | None) -> str:
        if self.settings.is_checkpoint_round(server_round):
            return "its checkpoint was never written"
        if record.get("complete") is False:
            return "the round did not finish"
        if ckpt is None:
            return "no checkpoint was written before the run stopped"
        return f"no checkpoint holds its model (the newest is {ckpt.name})"

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
            "wire-format": s.wire_format,
            DIGEST_KEY: digest(self.stats),  # the statistics themselves go beside the config (zk0.stats.STATS_KEY)
            # Read by the nodes in the last round's evaluate message (zk0.node.personal).
            "personalize-steps": s.personalize_steps,
            "personalize-mu": s.personalize_mu,
            **self.adapter.to_config(),
        }

    def end_round(self, server_round: int, state: dict) -> dict | None:
        """Evaluate and checkpoint the global model as the settings ask; record the round."""
        if server_round == self.start_round and server_round > 0:
            return (self.recorder.rounds.get(server_round) or {}).get("server_eval")  # done before the restart
        apply_trainable(self.policy, state)
        metrics = None
        if self.batches is not None and self.settings.is_eval_round(server_round):
            started = time.perf_counter()
            metrics = evaluate_policy(self.policy, self.eval_preprocessor, self.postprocessor, self.batches,
                                      self.settings.seed)
            metrics["eval_seconds"] = time.perf_counter() - started
            log.info("round %d server eval: loss %.4f action MSE %.4f", server_round, metrics["policy_loss"],
                     metrics["action_mse"])
        sim, videos = None, []
        if self.sim is not None and self.settings.is_sim_round(server_round):
            sim, videos = self.sim.score(self.policy, from_json(self.stats) if self.stats else None, server_round)
        self.recorder.set(server_round, server_eval=metrics, elapsed_seconds=self.recorder.elapsed(),
                          **({"sim_eval": sim} if sim else {}))
        if self.settings.is_checkpoint_round(server_round):
            path = self.checkpoint(server_round)
            if self.settings.is_push_round(server_round):
                self.publisher.push(server_round, path)
        self.recorder.set(server_round, complete=True)  # evaluated and, when due, checkpointed
        history = self.history()
        if metrics is not None or sim is not None:
            self.plotter.submit(history)
        self.tracker.log_round(server_round, history[-1])
        self.tracker.log_videos(server_round, videos)
        return metrics

    def log_round(self, server_round: int) -> None:
        """Log a round's record to WandB again: nodes' in-train evaluations of its model arrive a round later."""
        self.tracker.log_round(server_round, self.recorder.rounds[server_round])

    def history(self) -> list[dict]:
        """Round records so far, oldest first."""
        return [self.recorder.rounds[r] for r in sorted(self.recorder.rounds)]

    def checkpoint(self, server_round: int) -> Path:
        """Save the global model in LeRobot's format under checkpoints/round-NNN."""
        base = describe(self.settings.base_policy, self.out_dir)  # a Hub id, or a path relative to the experiment
        info = {"round": server_round, "base_policy": base, "base_fingerprint": self.fingerprint}
        path = save_checkpoint(
            self.policy, self.preprocessor, self.postprocessor,
            self.out_dir / "checkpoints" / f"round-{server_round:03d}", info,
            extra_files={"README.md": model_card(self.settings, self.history(), server_round)},
        )
        log.info("round %d checkpoint: %s", server_round, path)
        return path
