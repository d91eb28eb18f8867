"""What `zk0 local`'s watch on its SuperNodes (zk0.deploy.node_watch), the ClientApp and the ServerApp agree on.

The ClientApp logs STARTED once Flower has started it; the watch reads that line in the SuperNode's log and
notes the nodes it gave up on in faults_file(OUTPUT_DIR), which the ServerApp reads to say why a node is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

# zk0's ClientApp logs this once Flower has started it (client_app.py): the start-up is over.
STARTED = "ClientApp started for the"
FAULTS_FILE = "node-faults.json"


def faults_file(output_dir: Path) -> Path:
    """Where `zk0 local` notes the nodes it gave up on, and why."""
    return Path(output_dir) / "local" / FAULTS_FILE


def read_faults(path: Path) -> dict[str, str]:
    """{node id: why zk0 local gave up on it}; empty when there is no such file (not under `zk0 local`)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
