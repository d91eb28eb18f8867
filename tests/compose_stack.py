"""Docker Compose helpers of tests/test_compose.py: the compose command, a test project (Stack), its outputs."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from zk0.deploy.local import free_port

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("ZK0_IMAGE", "zk0:latest")
CPU = ["-f", "compose.yaml", "-f", "compose.cpu.yaml"]
DEMO_ENV = ["--env-file", "experiments/demo.env"]



def normal_priority() -> None:
    """Run a child at normal priority. Under a realtime policy (seen here: the suite's process at
    SCHED_FIFO 99) the Go programs docker and docker-compose livelock on two cores, spinning forever
    and starving the test process whose timeout would stop them."""
    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def compose(
    *args: str, env: dict | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    res = subprocess.run(["docker", "compose", *args], cwd=ROOT, env=env or clean_env(), capture_output=True,
                         text=True, timeout=timeout, preexec_fn=normal_priority)
    if check and res.returncode != 0:
        raise AssertionError(
            f"docker compose {' '.join(args)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
    return res


def clean_env(**extra: str) -> dict[str, str]:
    # The developer's own ZK0_ / compose variables must not leak into what the test checks.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZK0_", "COMPOSE_", "WANDB_", "SUPERLINK_"))}
    return {**env, **extra}


def config(*args: str, env: dict | None = None) -> dict:
    return json.loads(compose(*args, "config", "--format", "json", env=env).stdout)


class Stack:
    """One Compose project of the CPU variant with the demo env-file; torn down with its volumes."""

    def __init__(self, project: str):
        self.project = project
        self.port = free_port()
        self.base = ["-p", project, *DEMO_ENV, *CPU]

    def env(self, **settings: str) -> dict[str, str]:
        return clean_env(SUPERLINK_PORT=str(self.port), ZK0_IMAGE=IMAGE, **settings)

    def __call__(self, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        return compose(*self.base, *args, env=env or self.env(), **kw)

    def overlay(self, *files: str) -> Stack:
        """The same project with more Compose files on top (e.g. compose.tls.yaml)."""
        other = copy.copy(self)
        other.base = [*self.base, *(arg for f in files for arg in ("-f", f))]
        return other

    def run(self, env: dict, timeout: float = 1500) -> tuple[int, float]:
        """`up -d`, then wait for the submit service; its exit code and the wall time from `up`."""
        started = time.monotonic()
        self("up", "-d", env=env, timeout=900)
        res = self("wait", "submit", env=env, timeout=timeout, check=False)
        # Compose prints the exit code alone, or 'container "ID" exited with status code N' (2.26).
        found = re.search(r"(\d+)\s*$", res.stdout.strip())
        code = int(found.group(1)) if found else -1
        return code, time.monotonic() - started

    def logs(self, service: str) -> str:
        return self("logs", "--no-log-prefix", "--no-color", service, check=False).stdout

    def read_outputs(self, script: str) -> dict:
        """Run a Python script in the image with the outputs volume mounted; its stdout as JSON."""
        res = subprocess.run(
            ["docker", "run", "--rm", "-v", f"{self.project}_outputs:/work/outputs:ro",
             "-v", f"{self.project}_demo-data:/work/demo-data:ro", "-e", "HF_HUB_OFFLINE=1",
             IMAGE, "python", "-c", script],
            capture_output=True, text=True, timeout=600, preexec_fn=normal_priority,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1])


def dump_logs(stack: Stack, services=("submit", "serverapp", "supernode-0", "superlink")) -> str:
    return "\n".join(f"--- {s} ---\n{stack.logs(s)[-2500:]}" for s in services)


OUTPUTS_SCRIPT = """
import json, pathlib
out = pathlib.Path("/work/outputs/{name}")
history = json.loads((out / "history.json").read_text())
ckpt = out / "checkpoints" / "round-{last:03d}"
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from lerobot.policies.factory import make_pre_post_processors
policy = SmolVLAPolicy.from_pretrained(str(ckpt))
pre, post = make_pre_post_processors(policy.config, pretrained_path=str(ckpt))
print(json.dumps({{
    "rounds": [r["round"] for r in history],
    "contributors": {{r["round"]: sorted(c["name"] for c in r["clients"].values() if "train" in c) for r in history}},
    "server_loss": {{r["round"]: r["server_eval"]["policy_loss"] for r in history if r.get("server_eval")}},
    "files": sorted(str(p.relative_to(out)) for p in out.glob("*.json")),
    "checkpoints": sorted(p.name for p in (out / "checkpoints").iterdir()),
    "parameters": sum(p.numel() for p in policy.parameters()),
}}))
"""


def outputs(stack: Stack, name: str, last: int) -> dict:
    return stack.read_outputs(OUTPUTS_SCRIPT.format(name=name, last=last))


def tls_files(directory: Path) -> Path:
    """compose.tls.yaml's files for the four nodes (SAN `superlink`, the name they dial), and a fifth key
    pair kept out of supernodes/*.pub so that the `register` service never registers it."""
    subprocess.run([str(ROOT / "superlink" / "make-certs.sh"), "-n", "5", str(directory), "superlink"], check=True,
                   capture_output=True, timeout=120)
    (directory / "supernodes" / "node-4.pub").rename(directory / "stranger.pub")
    subprocess.run(["chown", "-R", "1000:1000", str(directory)], check=True)  # the image's zk0 user reads them
    return directory


def robot_dataset(stack: Stack) -> Path:
    """A SO-100 dataset on this host's disk, as a robot host has one: node-1's, copied out of the volume."""
    host_dir = Path(tempfile.mkdtemp(prefix="zk0-robot-"))
    stack.client.containers.run(
        IMAGE, ["sh", "-c", "cp -r /work/demo-data/datasets/node-1/. /robot/"], remove=True, user="0",
        volumes={f"{stack.project}_demo-data": {"bind": "/work/demo-data", "mode": "ro"},
                 str(host_dir): {"bind": "/robot", "mode": "rw"}},
    )
    subprocess.run(["chmod", "-R", "a+rX", str(host_dir)], check=True)
    return host_dir
