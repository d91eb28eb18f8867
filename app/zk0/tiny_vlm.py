"""A tiny, randomly initialised SmolVLM backbone directory that SmolVLA can load offline."""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, SmolVLMConfig, SmolVLMProcessor
from transformers.models.smolvlm import SmolVLMImageProcessor, SmolVLMVideoProcessor

IMAGE_SIZE = 64
PATCH_SIZE = 8
SCALE_FACTOR = 2
TEXT_LAYERS = 4
# One image becomes (64/8)^2 patches, pixel-shuffled down by scale_factor^2.
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# SmolVLA reads fake_image_token_id / global_image_token_id from the tokenizer, and
# SmolVLMProcessor reads the others: they must be named tokens, not just added ones.
NAMED_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}

CORPUS = [
    "pick the red cube",
    "push the block left",
    "open the gripper",
    "wave the arm",
    "reach the target and stop",
    "pick up the cube and place it in the box",
    "move the arm to the left",
    "move the arm to the right",
    "close the gripper slowly",
    "rotate the wrist",
    "lift the shoulder",
    "bend the elbow",
    "the robot arm has six joints",
    "shoulder pan, shoulder lift, elbow flex, wrist flex, wrist roll, gripper",
    "a red square marks the target on the table",
    "the front camera sees the table and the wrist camera sees the gripper",
    "grasp the green block",
    "put the blue cube on the red cube",
    "stack the blocks",
    "wave hello with the arm",
    "push the object to the right",
    "open and close the gripper",
    "go back to the home position",
    "What action should the robot take?",
]


def _train_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on a small robot-task corpus."""
    specials = [PAD, BOS, EOS, *NAMED_TOKENS.values()]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    # The full byte alphabet keeps every string encodable, even unseen words.
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS + [line + "\n" for line in CORPUS]
    raw.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=PAD,
        extra_special_tokens=dict(NAMED_TOKENS),
    )


def _tiny_config(tokenizer: PreTrainedTokenizerFast) -> SmolVLMConfig:
    """SmolVLM config scaled down to a few hundred thousand parameters."""
    vocab = len(tokenizer)
    text = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
    }
    return SmolVLMConfig(
        text_config=text,
        vision_config=vision,
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids(NAMED_TOKENS["image_token"]),
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=vocab,
    )


def build_tiny_vlm(out_dir: Path) -> Path:
    """Write a tiny SmolVLM config, processor and tokenizer (no weights) into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    _tiny_config(tokenizer).save_pretrained(out_dir)
    # No image splitting: every 64x64 frame maps to exactly IMAGE_SEQ_LEN tokens.
    size = {"longest_edge": IMAGE_SIZE}
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(
            size=size, max_image_size=size, do_image_splitting=False
        ),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(size=size, max_image_size=size),
        image_seq_len=IMAGE_SEQ_LEN,
    )
    processor.save_pretrained(out_dir)
    return out_dir
