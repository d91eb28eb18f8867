"""Typed settings for each process role, read from ZK0_* variables and Flower configs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

# NodeSettings and the shared helpers live in their own modules; every name stays importable from here.
from .cameras import CameraMap
from .hub import check_spec
from .node_settings import NodeSettings
from .privacy import dp_problems
from .settings_base import ENV_PREFIX, SettingsError, default_cache_dir, resolve_device
from .settings_secagg import PrivacySettings, secagg_problems

__all__ = [
    "AGGREGATION_SETTINGS", "ENV_PREFIX", "SERVER_OPT_SETTINGS", "NodeSettings", "ServerSettings", "SettingsError",
    "default_cache_dir", "resolve_device",
]


# The server-optimiser settings each ZK0_STRATEGY takes: the arguments of Flower's FedAvgM, FedAdam, FedYogi
# and FedAdagrad (FedAdagrad fixes its betas to 0).
SERVER_OPT_SETTINGS = {
    "fedprox": (),
    "fedavgm": ("server_learning_rate", "server_momentum"),
    "fedadam": ("server_learning_rate", "server_beta_1", "server_beta_2", "server_tau"),
    "fedyogi": ("server_learning_rate", "server_beta_1", "server_beta_2", "server_tau"),
    "fedadagrad": ("server_learning_rate", "server_tau"),
}

# ZK0_AGGREGATION's own settings, and the fewest updates a round needs with f = ZK0_BYZANTINE_NODES: (a, b) for
# a*f + b (Krum: Blanchard et al. 2017, n >= 2f + 3; Bulyan: El Mhamdi et al. 2018, n >= 4f + 3).
AGGREGATION_SETTINGS = {
    "mean": (), "median": (), "trimmed": ("trim_fraction",), "krum": ("byzantine_nodes",),
    "multikrum": ("byzantine_nodes", "multikrum_select"), "bulyan": ("byzantine_nodes",),
}
_FEWEST = {"krum": (2, 3), "multikrum": (2, 3), "bulyan": (4, 3)}


def aggregation_problems(s: ServerSettings) -> list[str]:
    """Every reason the bounded-influence and ZK0_AGGREGATION settings cannot work together, naming the variables."""
    rule, f, problems = s.aggregation, s.byzantine_nodes or 0, []
    for name in ("trim_fraction", "byzantine_nodes", "multikrum_select"):
        if getattr(s, name) is not None and name not in AGGREGATION_SETTINGS[rule]:
            users = ", ".join(r for r, takes in AGGREGATION_SETTINGS.items() if name in takes)
            problems.append(f"{ENV_PREFIX}{name.upper()}: not used by {ENV_PREFIX}AGGREGATION={rule} (only by "
                            f"{users}); unset it, or choose an aggregation that uses it")
    if rule in _FEWEST and s.min_nodes < (need := _FEWEST[rule][0] * f + _FEWEST[rule][1]):
        problems.append(f"{ENV_PREFIX}AGGREGATION={rule} with {ENV_PREFIX}BYZANTINE_NODES={f} needs at least "
                        f"{need} updates a round, {ENV_PREFIX}MIN_NODES={s.min_nodes}: raise {ENV_PREFIX}MIN_NODES "
                        f"(and run that many nodes) or lower {ENV_PREFIX}BYZANTINE_NODES")
    if rule == "multikrum" and (s.multikrum_select or 1) > s.min_nodes - f:
        problems.append(f"{ENV_PREFIX}MULTIKRUM_SELECT={s.multikrum_select} is above {ENV_PREFIX}MIN_NODES - "
                        f"{ENV_PREFIX}BYZANTINE_NODES = {s.min_nodes - f}: MultiKrum averages at most the n - f "
                        "best-scored updates; lower it")
    problems += secagg_problems(s)
    if 0 < s.norm_bound_factor < 1:
        problems.append(f"{ENV_PREFIX}NORM_BOUND_FACTOR={s.norm_bound_factor}: below 1 it would clip the median "
                        "update itself; use 0 (off) or a value >= 1")
    return problems


class ServerSettings(PrivacySettings):
    """What the ServerApp (and `zk0 local`) needs to run one experiment."""

    num_rounds: int = Field(3, ge=1, description="Federated rounds to run; set at least 1.")
    local_steps: int = Field(20, ge=1, description="Optimizer steps per node per round; at least 1.")
    batch_size: int = Field(8, ge=1, description="Batch size on each node and for evaluation; at least 1.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate; a positive number.")
    proximal_mu: float = Field(0.01, ge=0, description="FedProx mu; 0 gives FedAvg, must be >= 0.")
    strategy: Literal["fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"] = Field(
        "fedprox",
        description="Server step: fedprox (the sample-weighted mean of the updates) or one of Flower's server "
        "optimisers applied to that mean: fedavgm, fedadam, fedyogi, fedadagrad. Nodes add the proximal term (mu) "
        "with every one.",
    )
    # Unset (None) = the default of the Flower class ZK0_STRATEGY names: only what is set is passed to it.
    server_learning_rate: float | None = Field(
        None, gt=0, description="Server learning rate (FedAvgM's server_learning_rate, FedOpt's eta), > 0; unset = "
        "Flower's default (1.0 fedavgm, 0.1 fedadam and fedadagrad, 0.01 fedyogi).",
    )
    server_momentum: float | None = Field(
        None, ge=0, lt=1, description="FedAvgM's server momentum, in [0, 1); unset = Flower's 0.0."
    )
    server_beta_1: float | None = Field(
        None, ge=0, lt=1, description="FedAdam/FedYogi first-moment decay beta_1, in [0, 1); unset = Flower's 0.9."
    )
    server_beta_2: float | None = Field(
        None, ge=0, lt=1, description="FedAdam/FedYogi second-moment decay beta_2, in [0, 1); unset = Flower's 0.99."
    )
    server_tau: float | None = Field(
        None, gt=0, description="FedAdam/FedYogi/FedAdagrad adaptivity tau (added to the root of the second moment), "
        "> 0; unset = Flower's 1e-3.",
    )
    # Bounded influence (zk0.server.influence): on by default, loose enough that honest nodes, which all claim
    # ZK0_LOCAL_STEPS x ZK0_BATCH_SIZE samples, are never capped or clipped.
    max_node_share: float = Field(
        0.5, gt=0, le=1, description="Largest share of a round's aggregation weight one node may get, in (0, 1]; "
        "weights above it are capped and the rest shared out again (1 = off).",
    )
    norm_bound_factor: float = Field(
        3.0, ge=0, description="With 3 or more updates, one further from the round's global model than this many "
        "times the median distance is scaled back to that bound; 0 = off, else >= 1.",
    )
    aggregation: Literal["mean", "median", "trimmed", "krum", "multikrum", "bulyan"] = Field(
        "mean", description="How updates combine: mean (sample-weighted) or Flower's robust FedMedian, FedTrimmedAvg "
        "(trimmed), Krum, MultiKrum, Bulyan; server optimisers (ZK0_STRATEGY) step on its result.",
    )
    trim_fraction: float | None = Field(
        None, ge=0, lt=0.5, description="ZK0_AGGREGATION=trimmed: share cut off each tail per value, in [0, 0.5); "
        "unset = Flower's 0.2.",
    )
    byzantine_nodes: int | None = Field(
        None, ge=0, description="ZK0_AGGREGATION=krum, multikrum or bulyan: how many nodes may be malicious (f), "
        ">= 0; unset = Flower's 0.",
    )
    multikrum_select: int | None = Field(
        None, ge=1, description="ZK0_AGGREGATION=multikrum: how many of the best-scored updates are averaged, >= 1; "
        "unset = Flower's 1 (Krum).",
    )
    fraction_train: float = Field(
        1.0, gt=0, le=1, description="Share of nodes sampled per round for training and evaluation, in (0, 1]."
    )
    min_nodes: int = Field(2, ge=1, description="Nodes that must reply before a round aggregates.")
    eval_every: int = Field(1, ge=1, description="Evaluate every N rounds (round 0 and the last always).")
    eval_feature_cache: bool = Field(
        True, description="Compute the evaluation set's frozen image features once, in memory (zk0.features), when "
        "the image path is frozen; false runs SmolVLA's image path at every evaluation.",
    )
    # Each message exchange costs seconds of Flower polling: by default the train message first evaluates the
    # global model it carries (the previous round's) and one evaluate message covers the last round's model.
    eval_mode: Literal["in-train", "separate"] = Field(
        "in-train", description="Where nodes evaluate the global model: in-train (in the next round's train "
        "message, one final evaluate message) or separate (an evaluate message after every evaluated round).",
    )
    checkpoint_every: int = Field(1, ge=1, description="Checkpoint every N rounds (the last always).")
    output_dir: Path = Field(Path("outputs"), description="Where rounds, history and checkpoints go.")
    base_policy: str = Field("lerobot/smolvla_base", description="Base SmolVLA: local dir or Hub id owner/name[@rev].")
    eval_dataset: str | None = Field(
        None, description="Server evaluation dataset: local root or Hub id (owner/name[@revision])."
    )
    eval_cameras: CameraMap | None = Field(
        None,
        description="Camera map of the evaluation dataset onto the policy's slots, e.g. top=camera1,wrist=camera2.",
    )
    eval_batches: int = Field(4, ge=1, description="Batches per evaluation; at least 1.")
    stats: Literal["federated", "base"] = Field(
        "federated",
        description="Normalisation statistics: federated (merged from every node's training episodes before round 1) "
        "or base (the base policy's own).",
    )
    cache_dir: Path | None = Field(
        None, description="Folder for datasets converted to LeRobot v3.0 (default ~/.cache/zk0)."
    )
    round_timeout: float = Field(3600.0, gt=0, description="Seconds to wait for node replies per round.")
    seed: int = Field(0, description="Seed for sampling, evaluation noise and training order.")
    device: str = Field("auto", description="Server evaluation device: auto, cpu, cuda or cuda:N.")
    wire_format: Literal["fp32", "fp16", "bf16", "int8-delta"] = Field(
        "fp16",
        description="How trainable weights travel: fp16 (default), bf16, fp32, or int8-delta (fp16 down, each node's "
        "update up in int8 with a scale per 4096 values: half the bytes); the server aggregates in fp32.",
    )
    trainable: Literal["expert", "lora"] = Field(
        "expert",
        description="What trains and travels: expert (SmolVLA's whole action expert) or lora (LoRA adapters through "
        "LeRobot's PEFT path; megabytes instead of hundreds of megabytes per round at full size).",
    )
    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank r (ZK0_TRAINABLE=lora); 1 to 256.")
    lora_alpha: int = Field(
        8, ge=1, description="LoRA alpha: the adapters' update is scaled by alpha/rank; at least 1."
    )
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path while training, in [0, 1).")
    lora_targets: str | None = Field(
        None,
        description="Regex of the module names LoRA wraps; unset = LeRobot's SmolVLA default (the action expert's "
        "q/v projections and the state, action and time projections).",
    )
    lora_aggregation: Literal["fedit", "ffa"] = Field(
        "fedit",
        description="How adapters federate: fedit (A and B trained and averaged separately) or ffa (A frozen and "
        "shared, only B trained and sent: exact averaging, half the bytes).",
    )
    # Personalisation (zk0.node.personal): after the last round each node fine-tunes the final global model on its own
    # training episodes, with Ditto's proximal term toward it, and keeps the result where a validation fifth of
    # those episodes says it beats the global model; only metrics come back.
    personalize_steps: int = Field(
        0, ge=0, description="Optimizer steps each node fine-tunes the final global model on its own training "
        "episodes (less a validation fifth); it keeps the result only where that validation part says it beats "
        "the global model, else the global model (in ZK0_NODE_<i>_PERSONAL_DIR); 0 = off, else at least 1.",
    )
    personalize_mu: float = Field(
        0.01, ge=0, description="Ditto's lambda: weight of (lambda/2)*||v - w_global||^2 while personalising, >= 0.",
    )
    # Adaptive mu (zk0.server.adaptive): FedProx's heuristic (Li et al. 2020, Sec. 5.3) on the nodes' mean training
    # loss.
    adaptive_mu: Literal["off", "loss"] = Field(
        "off", description="off (mu stays ZK0_PROXIMAL_MU) or loss (FedProx's rule: mu + step when the nodes' mean "
        "training loss rose, mu - step after PATIENCE rounds in a row it fell; within [0, ZK0_ADAPTIVE_MU_MAX]).",
    )
    adaptive_mu_step: float = Field(
        0.01, gt=0, description="ZK0_ADAPTIVE_MU=loss: how much mu moves per change, > 0."
    )
    adaptive_mu_patience: int = Field(
        1, ge=1, description="ZK0_ADAPTIVE_MU=loss: rounds of falling loss in a row before mu decreases, >= 1.",
    )
    adaptive_mu_max: float = Field(
        1.0, gt=0, description="ZK0_ADAPTIVE_MU=loss: largest mu, > 0 and >= ZK0_PROXIMAL_MU."
    )
    # Closed-loop evaluation (zk0.sim, the optional simulator): the global model drives a simulated SO-101 arm on each
    # simulated lab's task; success rates beside the offline losses.
    sim_eval_every: int = Field(
        0, ge=0, description="Score the global model in the SO-101 simulator every N rounds (round 0 and the last "
        "too); 0 = off. Needs the simulator: pip install 'zk0[sim]'.",
    )
    sim_labs: str | None = Field(
        None, description="Simulated labs whose tasks the global model is scored on, comma-separated (lift-top, "
        "lift-front, place-laptop, lift-up); unset = all.",
    )
    sim_episodes: int = Field(5, ge=1, description="Simulated episodes per lab per evaluation; at least 1.")
    sim_videos: int = Field(
        1, ge=0, description="Episodes per lab saved as MP4 (OUTPUT_DIR/videos/) and logged to WandB; 0 = none."
    )
    wandb_project: str = Field("zk0", min_length=1, description="WandB project of the experiment's run.")
    hf_repo_id: str | None = Field(
        None, pattern=r"^[\w.-]+/[\w.-]+$", description="Hub repo to push checkpoints to (owner/name); needs HF_TOKEN."
    )
    hf_private: bool = Field(False, description="Create the Hub repo as private.")
    push_every: int = Field(1, ge=1, description="Push every N checkpoints' rounds (the last always).")

    _specs = field_validator("base_policy", "eval_dataset")(check_spec)

    @field_validator("sim_labs")
    @classmethod
    def _labs(cls, value: str | None) -> str | None:
        from .labs import parse_labs

        return ",".join(lab.name for lab in parse_labs(value, setting="names")) if value else None

    @field_validator("lora_targets")
    @classmethod
    def _targets(cls, value: str | None) -> str | None:
        if value:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"not a regular expression ({err})") from None
        return value

    @model_validator(mode="after")
    def _server_opt_settings(self) -> Self:
        # A momentum or beta meant for another strategy would otherwise be ignored without a word.
        takes = SERVER_OPT_SETTINGS[self.strategy]
        stray = [f"{ENV_PREFIX}{f.upper()}" for f in type(self).model_fields
                 if f.startswith("server_") and getattr(self, f) is not None and f not in takes]
        if stray:
            allowed = ", ".join(f"{ENV_PREFIX}{f.upper()}" for f in takes) or "none of them"
            raise ValueError(
                f"{', '.join(stray)}: not used by {ENV_PREFIX}STRATEGY={self.strategy} (it takes {allowed}); "
                "unset it, or choose a strategy that uses it"
            )
        return self

    @model_validator(mode="after")
    def _aggregation_settings(self) -> Self:
        if problems := aggregation_problems(self) + dp_problems(self):
            raise ValueError("\n  ".join(problems))
        return self

    @model_validator(mode="after")
    def _adaptive_mu_bounds(self) -> Self:
        if self.adaptive_mu != "off" and self.proximal_mu > self.adaptive_mu_max:
            raise ValueError(
                f"{ENV_PREFIX}PROXIMAL_MU={self.proximal_mu} is above "
                f"{ENV_PREFIX}ADAPTIVE_MU_MAX={self.adaptive_mu_max}: the adaptive rule starts from mu and keeps it "
                "within [0, max]; raise the max or lower mu"
            )
        return self

    def is_eval_round(self, server_round: int) -> bool:
        """Round 0, every `eval_every` rounds and the last round are evaluated."""
        return server_round == 0 or server_round % self.eval_every == 0 or server_round == self.num_rounds

    def is_sim_round(self, server_round: int) -> bool:
        """Round 0, every `sim_eval_every` rounds and the last round, when the simulator evaluation is on."""
        every = self.sim_eval_every
        return every > 0 and (server_round == 0 or server_round % every == 0 or server_round == self.num_rounds)

    def is_push_round(self, server_round: int) -> bool:
        """Checkpoint rounds that are also every `push_every` rounds, and the last round."""
        return self.is_checkpoint_round(server_round) and (
            server_round % self.push_every == 0 or server_round == self.num_rounds
        )

    def is_checkpoint_round(self, server_round: int) -> bool:
        """Every `checkpoint_every` rounds and the last round are checkpointed."""
        return server_round > 0 and (server_round % self.checkpoint_every == 0 or server_round == self.num_rounds)
