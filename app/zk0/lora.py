"""LoRA federation: what trains and travels when ZK0_TRAINABLE=lora, through LeRobot's own PEFT path.

The base policy is wrapped with `PreTrainedPolicy.wrap_with_peft` (SmolVLA's default targets: the
action expert's q/v projections and the state/action/time projections), so only the adapters train
and travel. Two ways to federate them (ZK0_LORA_AGGREGATION):

- `fedit`: every node trains A and B; the server averages A and B separately (FedIT, Zhang et al.
  2024, "Towards Building the Federated GPT"). Cheap, but mean(B)·mean(A) is not mean(B·A): the
  average of the nodes' updates is only approximated.
- `ffa`: A stays frozen at a random initialisation every node shares; only B trains and travels
  (FFA-LoRA, Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning"). Then
  mean(B)·A = mean(B·A): the server's average is exactly the average of the nodes' low-rank updates,
  and half the bytes travel.

Checkpoints stay loadable by plain LeRobot: the merged policy (W + scale·B·A) in LeRobot's format in
the checkpoint folder, and the adapter in PEFT's format (what `lerobot-train` with PEFT pushes) in
its `adapter/` subfolder.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger("zk0")
ADAPTER_DIR = "adapter"  # the PEFT adapter's folder inside a checkpoint
# Config keys of the train/query messages that carry the adapter: every node wraps as the server does.
CONFIG_KEYS = {
    "trainable": "trainable", "rank": "lora-rank", "alpha": "lora-alpha", "dropout": "lora-dropout",
    "targets": "lora-targets", "aggregation": "lora-aggregation",
}


@dataclass(frozen=True)
class Adapter:
    """What trains: the full action expert, or LoRA adapters with these hyper-parameters."""

    trainable: str = "expert"  # expert | lora
    rank: int = 8
    alpha: int = 8
    dropout: float = 0.0
    targets: str = ""  # a module-name regex; "" = LeRobot's default targets for SmolVLA
    aggregation: str = "fedit"  # fedit | ffa

    @property
    def lora(self) -> bool:
        return self.trainable == "lora"

    @classmethod
    def from_settings(cls, settings) -> Adapter:
        """The server settings' adapter (ServerSettings: trainable, lora_*)."""
        return cls(
            settings.trainable, settings.lora_rank, settings.lora_alpha, settings.lora_dropout,
            settings.lora_targets or "", settings.lora_aggregation,
        )

    def to_config(self) -> dict:
        """Kebab-case keys for a Flower ConfigRecord."""
        return {key: value for field, key in CONFIG_KEYS.items() if (value := asdict(self)[field]) is not None}

    @classmethod
    def from_config(cls, config: dict) -> Adapter:
        """The adapter a message asks for (messages of an older server carry none: the full expert)."""
        values = {field: config[key] for field, key in CONFIG_KEYS.items() if key in config}
        for field, kind in (("rank", int), ("alpha", int), ("dropout", float), ("targets", str), ("trainable", str)):
            if field in values:
                values[field] = kind(values[field])
        return cls(**values)

    def tag(self) -> str:
        """What the weights' layout fingerprint covers beyond names and shapes ("" for the full expert)."""
        if not self.lora:
            return ""
        return f"lora;alpha={self.alpha};dropout={self.dropout};targets={self.targets};{self.aggregation}"


def _init_a(peft_model, seed: int) -> None:
    """Draw every LoRA A from one CPU generator: the same A on every node and the server, GPU or not.

    PEFT initialises A with kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), on the
    layer's device; a CUDA and a CPU generator give different numbers for one seed. FFA-LoRA needs one
    shared A, and a reproducible start helps FedIT too, so A is redrawn here from the same distribution.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if ".lora_A." in name:
                bound = 1.0 / math.sqrt(param.shape[1])
                param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=generator))


def wrap(policy, base_path: str, adapter: Adapter, seed: int):
    """The policy wrapped with LoRA adapters through LeRobot's `wrap_with_peft`; only adapters train."""
    policy.config.pretrained_path = base_path  # LeRobot refuses PEFT without a base; PEFT records it
    overrides = {"r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout}
    if adapter.targets:
        overrides["target_modules"] = adapter.targets
    root = logging.getLogger()
    quiet = _DropMessage("Training SmolVLA from scratch using PEFT")  # said whenever load_vlm_weights=False,
    root.addFilter(quiet)  # though every weight was just loaded from the base policy's file
    try:
        peft_model = policy.wrap_with_peft(peft_cli_overrides=overrides)
    finally:
        root.removeFilter(quiet)
    _init_a(peft_model, seed)
    if adapter.aggregation == "ffa":
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise ValueError(f"LoRA targets {adapter.targets or '(LeRobot default)'} match no module of the policy")
    return peft_model


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def is_peft(policy) -> bool:
    """Whether `policy` is a PEFT-wrapped policy."""
    return hasattr(policy, "peft_config")


def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The plain policy's state dict with every adapter merged in (W + scale·B·A), without touching the model."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            deltas[f"{name}.base_layer.weight"] = module.get_delta_weight("default")
    merged = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        if key in deltas:
            value = value + deltas[key].to(value.dtype)
        merged[key.replace(".base_layer.", ".")] = value
    return merged


def save(peft_model, directory: Path) -> None:
    """The merged policy in LeRobot's format in `directory`, and the adapter in PEFT's format in directory/adapter."""
    base = peft_model.get_base_model()
    config = base.config
    config.use_peft = False  # the merged policy is a plain SmolVLA
    try:
        base.save_pretrained(directory, state_dict=merged_state_dict(peft_model))
    finally:
        config.use_peft = True
    # As lerobot-train pushes a PEFT policy: the adapter, and the policy config beside it (use_peft=true).
    peft_model.save_pretrained(directory / ADAPTER_DIR)
    config.save_pretrained(directory / ADAPTER_DIR)


def load_adapter(peft_model, directory: Path) -> None:
    """Put a checkpoint's saved adapter weights (directory/adapter) back into `peft_model` (resume)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(Path(directory) / ADAPTER_DIR / "adapter_model.safetensors")
    result = set_peft_model_state_dict(peft_model, weights)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"adapter in {directory} does not fit the policy: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
