"""Checkpoints that load on another machine: a local VLM folder travels inside them, named relatively.

SmolVLA builds its backbone from `vlm_model_name` (AutoConfig/AutoProcessor) and its tokenizer step from
`tokenizer_name` (AutoTokenizer), even when every weight comes from model.safetensors. A Hub id resolves
anywhere and is kept as it is; a local folder (the offline demo's tiny VLM) is copied into the checkpoint
as `vlm/` and named `vlm` there. transformers resolves a relative name against the working directory, so
LeRobot alone loads such a checkpoint from inside its folder; from anywhere else `localize` (or the
three lines in README "Use a checkpoint") points the names at the checkpoint's own copy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

VLM_DIR = "vlm"
TOKENIZER_STEP = "tokenizer_processor"  # LeRobot's registry name of TokenizerProcessorStep
# The checkpoint's model.safetensors holds the whole policy, the VLM's weights included: its copy needs none.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def local_vlm(name: str) -> Path | None:
    """The folder `vlm_model_name` names when it is a local one (a Hub id gives None)."""
    path = Path(name).expanduser()
    return path if name and path.is_dir() else None


def bundle_vlm(checkpoint: Path, vlm_model_name: str) -> None:
    """Copy a local VLM folder into `checkpoint` and name it relatively in every saved config; a Hub id stays."""
    source = local_vlm(vlm_model_name)
    if source is None:
        return
    checkpoint = Path(checkpoint)
    shutil.copytree(source, checkpoint / VLM_DIR, ignore=_weights, dirs_exist_ok=True)
    for config in checkpoint.rglob("config.json"):
        if config.parent.is_relative_to(checkpoint / VLM_DIR):
            continue
        data = json.loads(config.read_text())
        if _same(data.get("vlm_model_name"), source):
            data["vlm_model_name"] = os.path.relpath(checkpoint / VLM_DIR, config.parent)
            data["load_vlm_weights"] = False  # its weights are in the checkpoint's own model.safetensors
            config.write_text(json.dumps(data, indent=4))
    for processor in checkpoint.glob("*processor*.json"):
        data = json.loads(processor.read_text())
        steps = [s for s in data.get("steps", []) if _same(s.get("config", {}).get("tokenizer_name"), source)]
        for step in steps:
            step["config"]["tokenizer_name"] = VLM_DIR
        if steps:
            processor.write_text(json.dumps(data, indent=2))


def _same(name: str | None, folder: Path) -> bool:
    return bool(name) and (found := local_vlm(name)) is not None and found.resolve() == folder.resolve()


def _weights(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if n.endswith(WEIGHT_SUFFIXES)]


def localize(path: str, vlm_model_name: str) -> str | None:
    """The checkpoint's own VLM copy as an absolute path when `vlm_model_name` is relative and `path` holds
    it (load from any working directory); None when the name needs no change (a Hub id, an absolute path)."""
    if not vlm_model_name or Path(vlm_model_name).is_absolute() or not Path(path).is_dir():
        return None
    inside = (Path(path) / vlm_model_name).resolve()
    return str(inside) if inside.is_dir() else None


def describe(spec: str | None, start: Path) -> str | None:
    """How records and model cards name a policy or dataset: a Hub id as it is, a local folder relative to
    `start` (the experiment's folder), so no absolute local path leaves this machine in a checkpoint."""
    if not spec:
        return spec
    path = Path(spec).expanduser()
    if not (spec.startswith(("/", ".", "~")) or path.exists()):
        return spec  # a Hub id (owner/name)
    return os.path.relpath(path.resolve(), Path(start).resolve())
