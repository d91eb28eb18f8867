"""Model cards for checkpoints and pushes to the Hugging Face Hub that never stop training."""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import HfApi, ModelCardData

from ..check import local_path
from ..hub import repo_name
from ..portable import describe

log = logging.getLogger("zk0")


def _is_hub_id(spec: str | None) -> bool:
    return bool(spec) and local_path(spec) is None and spec.count("/") == 1


def _eval_table(history: list[dict]) -> str:
    rows = ["| round | server policy loss | server action MSE | nodes' held-out loss | simulated success | "
            "contributors |", "|---|---|---|---|---|---|"]
    for r in history:
        server = r.get("server_eval") or {}
        held = (r.get("eval_aggregate") or {}).get("policy_loss")
        cells = [server.get("policy_loss"), server.get("action_mse"), held]
        text = [f"{c:.4f}" if isinstance(c, float) else "–" for c in cells]
        sim = (r.get("sim_eval") or {}).get("all")
        text.append(f"{sim['successes']}/{sim['episodes']} ({sim['ci_low']:.2f}-{sim['ci_high']:.2f})" if sim else "–")
        rows.append(f"| {r['round']} | {' | '.join(text)} | {len(r.get('contributors', [])) or '–'} |")
    return "\n".join(rows)


SCHEDULE = "SmolVLA's AdamW and cosine-with-warm-up presets, one schedule across rounds"


def model_card(settings, history: list[dict], server_round: int) -> str:
    """README.md text with Hub metadata, how the model was trained and how well it does."""
    nodes = {c.get("name", k): c.get("dataset", "?") for r in history for k, c in r.get("clients", {}).items()}
    data = _card_data(settings, nodes)
    # Local folders are named relative to the experiment's folder: a card never carries this machine's paths.
    here = Path(settings.output_dir)
    nodes = {name: describe(dataset, here) for name, dataset in nodes.items()}
    repo = settings.hf_repo_id or "PATH_TO_THIS_FOLDER"
    node_lines = "\n".join(f"- `{name}`: `{dataset}`" for name, dataset in sorted(nodes.items())) or "- (none recorded)"
    return f"""---
{data.to_yaml()}
---

# SmolVLA fine-tuned with federated learning (zk0), round {server_round}

This policy was fine-tuned from `{describe(settings.base_policy, here)}` by {len(nodes)} robot labs that never shared
their data: each Flower SuperNode trained on its own dataset with FedProx's proximal term and a
server aggregated the trainable weights (server step: {settings.strategy}).

## Training

- rounds: {server_round} of {settings.num_rounds}
- nodes and their datasets:
{node_lines}
- FedProx mu: {settings.proximal_mu}
- server strategy: {settings.strategy}
- trained weights: {_trained(settings)}
- peak learning rate: {settings.learning_rate} ({SCHEDULE})
- local steps per round: {settings.local_steps}, batch size {settings.batch_size}
- server evaluation dataset: `{describe(settings.eval_dataset, here) or 'none'}`
- differential privacy: {_privacy(settings, history, server_round)}

## Evaluation

Deterministic evaluation (seeded flow-matching noise). Action MSE is in the dataset's action units. Simulated
success: episodes where the policy made the simulated SO-101 arm succeed at its lab's task (zk0.sim, all labs
scored; 95% Wilson interval), on scenes never recorded.

{_eval_table([r for r in history if r['round'] <= server_round])}

## Use

```python
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from lerobot.policies.factory import make_pre_post_processors

policy = SmolVLAPolicy.from_pretrained("{repo}")
pre, post = make_pre_post_processors(policy.config, pretrained_path="{repo}")
```
{_adapter_use(settings)}"""


def _privacy(settings, history: list[dict], server_round: int) -> str:
    """What the card says of differential privacy: off, or the (epsilon, delta) spent up to this round."""
    spent = [r["privacy"] for r in history if r.get("privacy") and r["round"] <= server_round]
    if settings.dp == "off" or not spent:
        return "off (ZK0_DP=off)"
    p = spent[-1]
    return (f"lab-level (epsilon = {p['epsilon']:.3g}, delta = {p['delta']:g}) after {p['releases']} round(s): each "
            f"lab's update clipped to L2 norm {p['clip_norm']:g} on its node, Gaussian noise (multiplier "
            f"{p['noise_multiplier']:.3g}) added to the mean by the server; {p['accounting']}")


def _card_data(settings, nodes: dict[str, str]) -> ModelCardData:
    """The card's Hub metadata; only Hub ids (not local paths) are named as base model and datasets."""
    # The Hub's metadata names repos, not revisions: a pinned id (owner/name@rev) is named without its revision.
    datasets = sorted({repo_name(d) for d in [*nodes.values(), settings.eval_dataset] if _is_hub_id(d)})
    return ModelCardData(
        library_name="lerobot",
        pipeline_tag="robotics",
        license="apache-2.0",
        tags=["lerobot", "smolvla", "robotics", "federated-learning", "flower", "fedprox", "zk0"],
        base_model=repo_name(settings.base_policy) if _is_hub_id(settings.base_policy) else None,
        datasets=datasets or None,
    )


def _trained(settings) -> str:
    if getattr(settings, "trainable", "expert") != "lora":
        return "SmolVLA's action expert (the vision encoder and VLM frozen)"
    return (
        f"LoRA adapters (rank {settings.lora_rank}, alpha {settings.lora_alpha}, "
        f"{settings.lora_aggregation} aggregation) "
        f"on `{settings.lora_targets or "LeRobot's SmolVLA default targets"}`; this folder holds the policy with the "
        "adapters merged in, and `adapter/` the adapter alone in PEFT's format"
    )


def _adapter_use(settings) -> str:
    if getattr(settings, "trainable", "expert") != "lora":
        return ""
    return """
The adapter alone (PEFT format, as `lerobot-train` with PEFT saves it) is in `adapter/`: LeRobot's
`make_policy` loads it onto its base policy when `policy.pretrained_path` points there, or
`peft.PeftModel.from_pretrained(SmolVLAPolicy.from_pretrained(BASE), "adapter")`.
"""


def push_checkpoint(
    ckpt_dir: Path, repo_id: str, server_round: int, *, token: str | None, private: bool = False
) -> str:
    """Create the repo if needed, upload the checkpoint to main and tag it; return the commit id."""
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=private)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(ckpt_dir), commit_message=f"zk0: global model after round {server_round}"
    )
    api.create_tag(repo_id, tag=f"round-{server_round:03d}", revision=commit.oid, exist_ok=True)
    return commit.oid


class Publisher:
    """Pushes checkpoints when configured; a failure is logged and retried at the next push."""

    def __init__(self, repo_id: str | None, token: str | None, private: bool = False):
        self.repo_id, self.token, self.private = repo_id, token, private
        self.pending: list[tuple[int, Path]] = []
        if repo_id and not token:
            log.warning("Hub: ZK0_HF_REPO_ID=%s is set but HF_TOKEN is not; pushes will likely fail", repo_id)

    def push(self, server_round: int, ckpt_dir: Path) -> bool:
        """Push this checkpoint (and any earlier one whose push failed); True when all went up."""
        if not self.repo_id:
            return False
        self.pending.append((server_round, ckpt_dir))
        while self.pending:
            r, path = self.pending[0]
            if not path.exists():  # superseded and removed: nothing left to push for it
                self.pending.pop(0)
                continue
            try:
                oid = push_checkpoint(path, self.repo_id, r, token=self.token, private=self.private)
            # Any failure (network, auth, Hub) is logged and retried: a push must never stop training.
            except Exception as err:  # noqa: BLE001 - deliberate: reported below, the checkpoint stays on disk
                log.warning(
                    "Hub: push of round %d to %s failed (%s); will retry at the next push", r, self.repo_id, err
                )
                return False
            log.info("Hub: pushed round %d to %s (commit %s, tag round-%03d)", r, self.repo_id, oid[:8], r)
            self.pending.pop(0)
        return True
