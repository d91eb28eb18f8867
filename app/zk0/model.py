"""SmolVLA loading, the trainable subset that travels, fingerprints and checkpoints."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.factory import make_pre_post_processors
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

from .hub import local_path, repo_name, snapshot
from .portable import TOKENIZER_STEP, bundle_vlm, localize

log = logging.getLogger("zk0")


def load_policy(path: str, device: str, adapter=None, seed: int = 0):
    """Load a saved SmolVLA (local dir or Hub id) onto `device`; with a LoRA `adapter` (zk0.lora.Adapter),
    wrapped so that only the adapters train (A drawn from `seed`)."""
    policy = _load_plain(policy_dir(path), device)
    if adapter is not None and adapter.lora:
        from .lora import wrap

        return wrap(policy, repo_name(path), adapter, seed)  # PEFT records the base as an id or a folder
    return policy


def _load_plain(path: str, device: str) -> SmolVLAPolicy:
    # Denormal floats (seen in near-zero activations of a freshly initialised expert) make
    # every CPU op ~50x slower; flushing them to zero changes nothing measurable.
    torch.set_flush_denormal(True)
    config = _config(path)
    config.device = device
    # Every weight is about to be read from the file, so the random initialisation LeRobot's
    # from_pretrained runs first is wasted (seconds for the full-size model, on every message).
    # Skipping it is only safe when the file holds every weight: strict loading checks that, and a
    # checkpoint that lacks some is loaded the ordinary way.
    from transformers.initialization import no_init_weights

    try:
        with no_init_weights():
            return SmolVLAPolicy.from_pretrained(path, config=config, strict=True)
    except RuntimeError as err:
        log.info("%s does not hold every weight (%s); loading it with LeRobot's initialisation", path, str(err)[:200])
    return SmolVLAPolicy.from_pretrained(path, config=config)


def load_processors(path: str, device: str, rename_map: dict[str, str] | None = None, stats: dict | None = None):
    """The pre/post processors saved beside a policy, moving batches to `device`.

    `rename_map` (dataset camera -> policy slot) goes to LeRobot's rename_observations_processor, as
    `lerobot-train --rename_map` does; `stats` replace the saved normalisation statistics in the
    normaliser and unnormaliser, as lerobot-train does with a dataset's own statistics.
    """
    path = policy_dir(path)
    config = PreTrainedConfig.from_pretrained(path)
    pre: dict = {"device_processor": {"device": device}}
    post: dict = {}
    if inside := localize(path, config.vlm_model_name):  # a checkpoint's own VLM copy, from any working directory
        config.vlm_model_name = inside
        pre[TOKENIZER_STEP] = {"tokenizer_name": inside}
    if rename_map:
        pre["rename_observations_processor"] = {"rename_map": dict(rename_map)}
    if stats is not None:
        pre["normalizer_processor"] = {"stats": stats}
        post["unnormalizer_processor"] = {"stats": stats}
    return make_pre_post_processors(
        config, pretrained_path=path, preprocessor_overrides=pre, postprocessor_overrides=post
    )


def policy_dir(spec: str) -> str:
    """The folder of a saved policy: a local one as given, a Hub id[@revision] from the Hub cache (downloaded,
    or resumed, the first time), so its bundled VLM folder and processors resolve like a local checkpoint's."""
    if local_path(spec) is not None:
        return spec
    return str(snapshot(spec, "model", "ZK0_BASE_POLICY"))


def _config(path: str) -> PreTrainedConfig:
    """The saved policy config, its relative VLM name (a checkpoint's own copy) made absolute."""
    config = PreTrainedConfig.from_pretrained(path)
    if inside := localize(path, config.vlm_model_name):
        config.vlm_model_name = inside
    return config


def trainable_names(policy: torch.nn.Module) -> list[str]:
    """Names of the parameters that train: only these travel between server and nodes."""
    return [name for name, p in policy.named_parameters() if p.requires_grad]


def trainable_params(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters themselves, detached (no copy): read them before training goes on."""
    return {name: p.detach() for name, p in policy.named_parameters() if p.requires_grad}


def trainable_shapes(policy: torch.nn.Module) -> dict[str, tuple]:
    """Names and shapes of the trainable parameters: the layout packed weights follow."""
    return {name: tuple(p.shape) for name, p in policy.named_parameters() if p.requires_grad}


def trainable_state(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU float32 copies of the trainable parameters."""
    return {
        name: p.detach().to("cpu", torch.float32, copy=True)
        for name, p in policy.named_parameters()
        if p.requires_grad
    }


def apply_trainable(policy: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy received weights into the trainable parameters; shapes and names must match."""
    params = dict(policy.named_parameters())
    expected = set(trainable_names(policy))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"weights do not match the policy: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            target = params[name]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"weight {name}: shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            target.copy_(value)  # converts dtype and device on the way, with no temporary copy


def frozen_fingerprint(policy: torch.nn.Module) -> str:
    """Short hash of the frozen weights: nodes and server must share the same base."""
    digest = hashlib.sha256()
    for name, p in policy.named_parameters():
        if not p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy())  # hashed in place, not copied
    return digest.hexdigest()[:16]


def save_checkpoint(
    policy, preprocessor, postprocessor, out_dir: Path, info: dict, extra_files: dict[str, str] | None = None
) -> Path:
    """Write a LeRobot-format checkpoint atomically: a crash never leaves a half directory. A local VLM folder
    is copied in and named relatively (zk0.portable), so the checkpoint loads wherever it is copied."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    if hasattr(policy, "peft_config"):  # LoRA: the merged policy, and the adapter in PEFT's format beside it
        from .lora import save

        save(policy, staging)
    else:
        policy.save_pretrained(staging)
    preprocessor.save_pretrained(staging)
    postprocessor.save_pretrained(staging)
    base = policy.get_base_model() if hasattr(policy, "peft_config") else policy
    bundle_vlm(staging, base.config.vlm_model_name)
    (staging / "zk0.json").write_text(json.dumps(info, indent=2))
    for name, text in (extra_files or {}).items():
        (staging / name).write_text(text)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    return out_dir


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (round-NNN with its zk0.json), or None."""
    done = [p for p in Path(root).glob("round-[0-9][0-9][0-9]") if (p / "zk0.json").is_file()]
    return max(done, key=lambda p: p.name) if done else None
