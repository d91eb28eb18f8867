"""Which ZK0_ variable names exist: a typo is refused with the nearest known name."""

from __future__ import annotations

import difflib
import re

from .attacks import ENV as TEST_ATTACK
from .node_settings import NodeSettings
from .settings import ServerSettings
from .settings_base import ENV_PREFIX, SettingsError

# `zk0 local` and compose give each SuperNode its own variables: ZK0_NODE_<i>_DATASET etc.
NODE_VAR = re.compile(rf"^{ENV_PREFIX}NODE_(\d+)_([A-Z_]+)$")
# Variables that only the deployment reads (compose*.yaml and .env.example): an env-file shared by
# `zk0 local` and Compose may hold them. What each does (the settings reference is generated from these).
DEPLOYMENT_SETTINGS = {
    "IMAGE": "Image every Compose service runs (built from docker/Dockerfile when missing).",
    "DATASETS_DIR": "Host folder mounted read-only at /work/datasets in the containers: local datasets go there and "
    "are named datasets/<folder> in the env-file.",
    "TLS_DIR": "compose.tls.yaml: the folder superlink/make-certs.sh wrote (ca.crt, superlink.crt/.key, supernodes/).",
    "SERVER_GPU": "The GPU the ServerApp evaluates on (shared with node 0 by default); compose.cpu.yaml drops it.",
}
DEPLOYMENT_NODE_SETTINGS = {
    "GPU": "The GPU node i is pinned to (NVIDIA device index or UUID; default i); compose.cpu.yaml drops it.",
}
DEPLOYMENT_NODE_FIELDS = set(DEPLOYMENT_NODE_SETTINGS)
DEPLOYMENT_VARS = {f"{ENV_PREFIX}{name}" for name in DEPLOYMENT_SETTINGS}


def check_env_names(names: set[str]) -> None:
    """Reject unknown ZK0_ variables so a typo never passes silently; name the nearest known one."""
    known = ServerSettings.env_names() | NodeSettings.env_names() | DEPLOYMENT_VARS | {TEST_ATTACK}
    node_fields = {n.upper() for n in NodeSettings.model_fields} | DEPLOYMENT_NODE_FIELDS
    unknown = []
    for name in sorted(n for n in names if n.startswith(ENV_PREFIX)):
        match = NODE_VAR.match(name)
        if name in known or (match and match.group(2) in node_fields):
            continue
        unknown.append(name + _did_you_mean(name, known, node_fields))
    if unknown:
        raise SettingsError(
            f"unknown variable(s) {', '.join(unknown)}: check the spelling; "
            f"known: {', '.join(sorted(known))} and ZK0_NODE_<i>_<FIELD>"
        )


def _did_you_mean(name: str, known: set[str], node_fields: set[str]) -> str:
    """' (did you mean ZK0_X?)' for the nearest known name, or '' when none is near."""
    if match := re.match(rf"^{ENV_PREFIX}NODE_(\d+)_(.*)$", name):
        candidates = {f"{ENV_PREFIX}NODE_{match.group(1)}_{field}" for field in node_fields}
    else:
        candidates = known
    near = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.8)
    return f" (did you mean {near[0]}?)" if near else ""
