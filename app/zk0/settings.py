"""Typed settings for each process role, read from ZK0_* variables and Flower configs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .cameras import format_camera_map, parse_camera_map

ENV_PREFIX = "ZK0_"


class SettingsError(ValueError):
    """A setting is invalid; the message names the variable and what to do."""


class _Zk0Settings(BaseSettings):
    """Shared behaviour: ZK0_ prefix, kebab-case at the Flower boundary, clear errors."""

    # An empty variable means unset: Compose passes `ZK0_X: ${ZK0_X:-}` for every setting.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True, env_ignore_empty=True)

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        """Build from the environment; `overrides` (snake_case) outrank it."""
        try:
            return cls(**{k: v for k, v in overrides.items() if v not in (None, "")})
        except ValidationError as err:
            raise SettingsError(_explain(cls, err)) from None

    @classmethod
    def from_flower_config(cls, config: dict[str, Any]) -> Self:
        """Build from a Flower run/node config (kebab-case keys; empty string means unset)."""
        known = cls.model_fields
        overrides = {k.replace("-", "_"): v for k, v in config.items()}
        return cls.load(**{k: v for k, v in overrides.items() if k in known})

    def to_flower_config(self) -> dict[str, Any]:
        """Kebab-case, TOML-friendly copy for `--run-config` / `--node-config`."""
        out = {}
        for key, value in self.model_dump(exclude_none=True).items():
            out[key.replace("_", "-")] = str(value) if isinstance(value, Path) else value
        return out

    @classmethod
    def env_names(cls) -> set[str]:
        """Every environment variable this class reads."""
        return {f"{ENV_PREFIX}{name.upper()}" for name in cls.model_fields}


def _camera_map(value: str | None) -> str | None:
    """Validate a camera map and write it in its canonical short form (full keys are accepted too)."""
    return format_camera_map(parse_camera_map(value)) or None if value is not None else None


def default_cache_dir() -> Path:
    """Where converted datasets go unless ZK0_CACHE_DIR says otherwise: $XDG_CACHE_HOME/zk0 or ~/.cache/zk0."""
    import os

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zk0"


def _explain(cls: type[BaseSettings], err: ValidationError) -> str:
    lines = [f"invalid {cls.__name__}:"]
    for e in err.errors():
        if not e["loc"]:  # a check across settings: its message names the variables itself
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
            continue
        field = str(e["loc"][0])
        var = f"{ENV_PREFIX}{field.upper()} (run/node config '{field.replace('_', '-')}')"
        hint = cls.model_fields[field].description if field in cls.model_fields else ""
        lines.append(f"  {var}: {e['msg']}; got {e.get('input')!r}. {hint}")
    return "\n".join(lines)


# The server-optimiser settings each ZK0_STRATEGY takes: the arguments of Flower's FedAvgM, FedAdam, FedYogi
# and FedAdagrad (FedAdagrad fixes its betas to 0).
SERVER_OPT_SETTINGS = {
    "fedprox": (),
    "fedavgm": ("server_learning_rate", "server_momentum"),
    "fedadam": ("server_learning_rate", "server_beta_1", "server_beta_2", "server_tau"),
    "fedyogi": ("server_learning_rate", "server_beta_1", "server_beta_2", "server_tau"),
    "fedadagrad": ("server_learning_rate", "server_tau"),
}


class ServerSettings(_Zk0Settings):
    """What the ServerApp (and `zk0 local`) needs to run one experiment."""

    num_rounds: int = Field(3, ge=1, description="Federated rounds to run; set at least 1.")
    local_steps: int = Field(20, ge=1, description="Optimizer steps per node per round; at least 1.")
    batch_size: int = Field(8, ge=1, description="Training batch size on each node; at least 1.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate; a positive number.")
    proximal_mu: float = Field(0.01, ge=0, description="FedProx mu; 0 gives FedAvg, must be >= 0.")
    strategy: Literal["fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"] = Field(
        "fedprox",
        description="Server step: fedprox (the sample-weighted mean of the updates) or one of Flower's server optimisers "
        "applied to that mean: fedavgm, fedadam, fedyogi, fedadagrad. Nodes add the proximal term (mu) with every one.",
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
    base_policy: str = Field("lerobot/smolvla_base", description="Base SmolVLA: local dir or Hub id.")
    eval_dataset: str | None = Field(None, description="Server evaluation dataset: local root or Hub id.")
    eval_cameras: str | None = Field(
        None, description="Camera map of the evaluation dataset onto the policy's slots, e.g. top=camera1,wrist=camera2."
    )
    eval_batches: int = Field(4, ge=1, description="Batches per evaluation; at least 1.")
    stats: Literal["federated", "base"] = Field(
        "federated",
        description="Normalisation statistics: federated (merged from every node's training episodes before round 1) "
        "or base (the base policy's own).",
    )
    cache_dir: Path | None = Field(None, description="Folder for datasets converted to LeRobot v3.0 (default ~/.cache/zk0).")
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
    lora_alpha: int = Field(8, ge=1, description="LoRA alpha: the adapters' update is scaled by alpha/rank; at least 1.")
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
    # training episodes, with Ditto's proximal term toward it, and keeps the result; only metrics come back.
    personalize_steps: int = Field(
        0, ge=0, description="Optimizer steps each node fine-tunes the final global model on its own episodes and "
        "keeps as its personal model (in the node's ZK0_NODE_<i>_PERSONAL_DIR); 0 = off, else at least 1.",
    )
    personalize_mu: float = Field(
        0.01, ge=0, description="Ditto's lambda: weight of (lambda/2)*||v - w_global||^2 while personalising, >= 0.",
    )
    # Adaptive mu (zk0.server.adaptive): FedProx's heuristic (Li et al. 2020, Sec. 5.3) on the nodes' mean training loss.
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
    wandb_project: str = Field("zk0", min_length=1, description="WandB project of the experiment's run.")
    hf_repo_id: str | None = Field(None, pattern=r"^[\w.-]+/[\w.-]+$", description="Hub repo to push checkpoints to (owner/name); needs HF_TOKEN.")
    hf_private: bool = Field(False, description="Create the Hub repo as private.")
    push_every: int = Field(1, ge=1, description="Push every N checkpoints' rounds (the last always).")

    _cameras = field_validator("eval_cameras")(_camera_map)

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

    def is_push_round(self, server_round: int) -> bool:
        """Checkpoint rounds that are also every `push_every` rounds, and the last round."""
        return self.is_checkpoint_round(server_round) and (
            server_round % self.push_every == 0 or server_round == self.num_rounds
        )

    def is_checkpoint_round(self, server_round: int) -> bool:
        """Every `checkpoint_every` rounds and the last round are checkpointed."""
        return server_round > 0 and (server_round % self.checkpoint_every == 0 or server_round == self.num_rounds)


class NodeSettings(_Zk0Settings):
    """What one SuperNode needs: its data, its split and its device."""

    dataset: str = Field(..., min_length=1, description="This node's LeRobot dataset: local root or Hub id.")
    name: str = Field("", description="Human-readable node name used in records; defaults to the dataset name.")
    cameras: str | None = Field(
        None, description="Camera map of this node's dataset onto the policy's slots, e.g. top=camera1,wrist=camera2."
    )
    cache_dir: Path | None = Field(None, description="Folder for datasets converted to LeRobot v3.0 (default ~/.cache/zk0).")
    heldout_episodes: int = Field(2, ge=0, description="Episodes held out for evaluation, never trained on.")
    partition_id: int | None = Field(None, ge=0, description="When one dataset is split across nodes: this node's part.")
    num_partitions: int | None = Field(None, ge=1, description="When one dataset is split across nodes: how many parts.")
    base_policy: str | None = Field(None, description="Override where this node finds the base policy.")
    device: str = Field("auto", description="Training device: auto, cpu, cuda or cuda:N.")
    video_backend: Literal["pyav", "torchcodec"] = Field("pyav", description="Video decoder for camera streams.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for torch; set when nodes share a host.")
    log_every: int = Field(5, ge=1, description="Log training progress every N steps.")
    warm: bool = Field(
        True, description="Keep the policy and datasets loaded between messages in a worker process; false loads them per message."
    )
    max_bad_samples: int = Field(
        10, ge=0, description="Unreadable samples (e.g. corrupt video frames) a node skips per round before it fails."
    )
    # Frozen-feature cache (zk0.features): with a frozen vision encoder each frame is decoded and encoded once.
    feature_cache: Literal["disk", "memory", "off"] = Field(
        "disk", description="Frozen image features: disk (memory-mapped in feature-cache-dir), memory, or off; "
        "off on its own when the image path trains or is augmented.",
    )
    feature_cache_dir: Path | None = Field(None, description="Folder of the feature cache (default <cache dir>/features).")
    feature_cache_max_gb: float = Field(
        20.0, gt=0, description="Size bound of the feature cache folder in GiB; a dataset that needs more runs uncached."
    )
    personal_dir: Path | None = Field(
        None, description="Where this node keeps its personalised model (ZK0_PERSONALIZE_STEPS), in LeRobot's format; "
        "default <cache dir>/personal/<name>. It never leaves the node.",
    )

    _cameras = field_validator("cameras")(_camera_map)

    @model_validator(mode="after")
    def _partitions_pair(self) -> Self:
        if (self.partition_id is None) != (self.num_partitions is None):
            raise ValueError("set both partition-id and num-partitions, or neither")
        if self.partition_id is not None and self.partition_id >= self.num_partitions:
            raise ValueError("partition-id must be smaller than num-partitions")
        return self

    @property
    def display_name(self) -> str:
        """The node's name, or its dataset's last path component."""
        return self.name or Path(self.dataset.rstrip("/")).name


# `zk0 local` and compose give each SuperNode its own variables: ZK0_NODE_<i>_DATASET etc.
NODE_VAR = re.compile(rf"^{ENV_PREFIX}NODE_(\d+)_([A-Z_]+)$")
# Variables that only the deployment reads (compose.yaml and .env.example): an env-file shared by
# `zk0 local` and Compose may hold them. Node i is pinned to GPU ZK0_NODE_<i>_GPU.
DEPLOYMENT_NODE_FIELDS = {"GPU"}
DEPLOYMENT_VARS = {f"{ENV_PREFIX}{name}" for name in ("IMAGE", "DATASETS_DIR", "TLS_DIR", "SERVER_GPU")}


def check_env_names(names: set[str]) -> None:
    """Reject unknown ZK0_ variables so a typo never passes silently."""
    known = ServerSettings.env_names() | NodeSettings.env_names() | DEPLOYMENT_VARS
    node_fields = {n.upper() for n in NodeSettings.model_fields} | DEPLOYMENT_NODE_FIELDS
    unknown = []
    for name in sorted(n for n in names if n.startswith(ENV_PREFIX)):
        match = NODE_VAR.match(name)
        if name in known or (match and match.group(2) in node_fields):
            continue
        unknown.append(name)
    if unknown:
        raise SettingsError(
            f"unknown variable(s) {', '.join(unknown)}: check the spelling; "
            f"known: {', '.join(sorted(known))} and ZK0_NODE_<i>_<FIELD>"
        )


def resolve_device(device: str) -> str:
    """Turn 'auto' into cuda when a GPU is visible, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
