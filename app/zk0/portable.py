"""Checkpoints that load on another machine: a local VLM folder travels inside them.

SmolVLA builds its backbone from `vlm_model_name` (AutoConfig/AutoProcessor) and its tokenizer step from
`tokenizer_name` (AutoTokenizer), even when every weight comes from model.safetensors. A Hub id resolves
anywhere and is kept as it is; a local folder (the offline demo's tiny VLM) is copied into the checkpoint
as `vlm/`. The saved names stay as they were: transformers resolves a relative name against the working
directory, not the checkpoint, so renaming them would stop plain `from_pretrained(dir)` from working on the
very machine that wrote the checkpoint. Where the named folder is gone (the checkpoint was copied
elsewhere), `localize` (or the lines in docs/getting-started.md, "Use a checkpoint elsewhere") points the names
at the copy.
"""

from __future__ import annotations

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
    """Copy a local VLM folder (without weights) into `checkpoint` as `vlm/`; a Hub id needs nothing."""
    source = local_vlm(vlm_model_name)
    if source is not None:
        shutil.copytree(source, Path(checkpoint) / VLM_DIR, ignore=_weights, dirs_exist_ok=True)


def _same(name: str | None, folder: Path) -> bool:
    return bool(name) and (found := local_vlm(name)) is not None and found.resolve() == folder.resolve()


def _weights(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if n.endswith(WEIGHT_SUFFIXES)]


def localize(path: str, vlm_model_name: str) -> str | None:
    """The checkpoint's own VLM copy when the folder `vlm_model_name` names is not there (the checkpoint
    moved); None when the name needs no change (it resolves, or it is a Hub id)."""
    if not vlm_model_name or local_vlm(vlm_model_name) is not None or not Path(path).is_dir():
        return None
    looks_local = vlm_model_name.startswith(("/", ".", "~")) or Path(vlm_model_name).name == VLM_DIR
    inside = (Path(path) / VLM_DIR).resolve()
    return str(inside) if looks_local and inside.is_dir() else None


def describe(spec: str | None, start: Path) -> str | None:
    """How records and model cards name a policy or dataset: a Hub id as it is, a local folder relative to
    `start` (the experiment's folder), so no absolute local path leaves this machine in a checkpoint."""
    if not spec:
        return spec
    path = Path(spec).expanduser()
    if not (spec.startswith(("/", ".", "~")) or path.exists()):
        return spec  # a Hub id (owner/name)
    return os.path.relpath(path.resolve(), Path(start).resolve())
