"""zk0: federated fine-tuning of LeRobot's SmolVLA with Flower."""

import warnings

# PEFT warns at import that Transformers < 5.6 is deprecated, in every ServerApp, node and worker that imports
# LeRobot's policies. LeRobot 0.6.1's smolvla extra pins transformers<5.6, so nobody running zk0 can act on it;
# only that message, from that module, is silenced.
warnings.filterwarnings(
    "ignore", message=r"Support for Transformers < 5\.6 is deprecated in PEFT", category=FutureWarning,
    module=r"peft\.import_utils",
)
