"""SmolVLA built from local files with random weights, full-size or small, plus synthetic batches and messages."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Message, Metadata, RecordDict
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.factory import make_pre_post_processors
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from transformers import SmolVLMConfig, SmolVLMProcessor
from transformers.models.smolvlm import SmolVLMImageProcessor, SmolVLMVideoProcessor

from ..demo import JOINTS, NODE_TASKS, POLICY_CAMERAS
from ..tiny_vlm import NAMED_TOKENS, _train_tokenizer, build_tiny_vlm

# SmolVLM2-500M, the backbone of lerobot/smolvla_base (REFERENCE.md); SmolVLA keeps 16 of its 32
# text layers by default. The vocabulary only sizes the embedding: our local tokenizer's ids fit in it.
FULL_TEXT = dict(
    vocab_size=49280, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
    num_attention_heads=15, num_key_value_heads=5, head_dim=64, max_position_embeddings=8192,
    rope_theta=100000.0, rms_norm_eps=1e-5,
)
FULL_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16)
FULL_IMAGE, FULL_SCALE = 512, 4
TINY_IMAGE = 64  # tiny_vlm.IMAGE_SIZE


def write_full_vlm(out_dir: Path) -> Path:
    """A full-size SmolVLM2-500M config, processor and local tokenizer (no weights) in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    SmolVLMConfig(
        text_config={"model_type": "llama", **FULL_TEXT, **ids},
        vision_config={**FULL_VISION, "image_size": FULL_IMAGE},
        scale_factor=FULL_SCALE,
        image_token_id=tokenizer.convert_tokens_to_ids(NAMED_TOKENS["image_token"]),
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=FULL_TEXT["vocab_size"],
    ).save_pretrained(out_dir)
    size = {"longest_edge": FULL_IMAGE}
    SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size=size, max_image_size=size, do_image_splitting=False),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(size=size, max_image_size=size),
        image_seq_len=(FULL_IMAGE // FULL_VISION["patch_size"]) ** 2 // FULL_SCALE**2,
    ).save_pretrained(out_dir)
    return out_dir


def policy_config(vlm_dir: Path, full: bool, device: str = "cpu") -> SmolVLAConfig:
    """SmolVLA's default config (full) or the demo's sizes (small), six joints and two cameras."""
    size = FULL_IMAGE if full else TINY_IMAGE
    image = PolicyFeature(FeatureType.VISUAL, (3, size, size))
    inputs = {"observation.state": PolicyFeature(FeatureType.STATE, (len(JOINTS),)),
              **{c: image for c in POLICY_CAMERAS[:2]}}
    small = {} if full else dict(num_vlm_layers=4, chunk_size=10, n_action_steps=10,
                                 resize_imgs_with_padding=(size, size))
    return SmolVLAConfig(
        input_features=inputs,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (len(JOINTS),))},
        vlm_model_name=str(Path(vlm_dir).resolve()),
        load_vlm_weights=False,
        device=device,
        push_to_hub=False,
        **small,
    )


def build_policy(workdir: Path, full: bool, device: str = "cpu", meta: bool = False, seed: int = 0) -> SmolVLAPolicy:
    """SmolVLA with random weights; on the meta device it has shapes only and takes no memory."""
    workdir = Path(workdir)
    vlm = write_full_vlm(workdir / "vlm-full") if full else build_tiny_vlm(workdir / "vlm-small")
    config = policy_config(vlm, full, device)
    torch.set_flush_denormal(True)  # as zk0.model.load_policy does
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        with torch.device("meta") if meta else torch.device("cpu"):
            policy = SmolVLAPolicy(config)
    return policy if meta else policy.to(device)


def processors_for(config: SmolVLAConfig, device: str = "cpu"):
    """LeRobot's SmolVLA pre- and postprocessor with unit statistics (the data is synthetic)."""
    dim = len(JOINTS)
    unit = {"mean": np.zeros(dim), "std": np.ones(dim), "min": -np.ones(dim), "max": np.ones(dim)}
    stats = {"observation.state": unit, "action": unit}
    overrides = {"device_processor": {"device": device}}
    return make_pre_post_processors(config, dataset_stats=stats, preprocessor_overrides=overrides)


def preprocessor_for(config: SmolVLAConfig, device: str = "cpu"):
    """LeRobot's SmolVLA preprocessor with unit statistics."""
    return processors_for(config, device)[0]


def save_base_policy(workdir: Path, full: bool) -> Path:
    """A base policy directory as a node loads it (random weights, unit-statistics processors)."""
    policy = build_policy(workdir, full)  # its config points at the VLM files written under workdir
    out = Path(workdir) / "base-policy"
    policy.save_pretrained(out)
    for processor in processors_for(policy.config):
        processor.save_pretrained(out)
    return out


def synthetic_batch(config: SmolVLAConfig, batch_size: int, seed: int = 0) -> dict:
    """A raw batch as LeRobot's dataloader yields it: cameras in [0, 1], state, an action chunk, tasks."""
    g = torch.Generator().manual_seed(seed)
    batch = {key: torch.rand(batch_size, *f.shape, generator=g) for key, f in config.image_features.items()}
    batch["observation.state"] = torch.randn(batch_size, len(JOINTS), generator=g)
    batch["action"] = torch.randn(batch_size, config.chunk_size, len(JOINTS), generator=g)
    batch["action_is_pad"] = torch.zeros(batch_size, config.chunk_size, dtype=torch.bool)
    batch["task"] = [NODE_TASKS[i % len(NODE_TASKS)] for i in range(batch_size)]
    return batch


def message(content: RecordDict, message_type: str = "train", reply_to: Message | None = None) -> Message:
    """A message with realistic metadata, built outside a running Flower app (no TaskIdentity)."""
    if reply_to is not None:
        return Message(content=content, reply_to=reply_to)
    metadata = Metadata(
        run_id=2**62, message_id="0" * 64, src_node_id=1, dst_node_id=2**62 + 7, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=43200.0, message_type=message_type, src_task_id=1, dst_task_id=2,
    )
    return Message(metadata=metadata, content=content)
