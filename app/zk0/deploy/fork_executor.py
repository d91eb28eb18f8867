"""Flower's subprocess executor with ClientApp processes forked from one that has imported Flower.

Flower 1.42's subprocess executor starts `flwr-clientapp --token T` for every message; each start
imports Flower again (1.1-1.3 s measured alone on an idle 2-core host), four at once on a 4-node
host, every round. This executor starts one fork server when it is built (zk0.deploy.app_forks:
Flower's `flwr-clientapp`, imported once) and hands it each ClientApp task's arguments; the server
forks a child that runs Flower's `flwr-clientapp` with them, in milliseconds. Tasks other than
ClientApps, tasks that install runtime dependencies, and any task the fork server cannot take (it
died, say) go through Flower's own executor unchanged. The fork server dies with this process
(parent-death signal), and its input closes when this process ends.

It leans on private Flower modules: `seam_problem()` says whether they are the ones this was written
against, and zk0.deploy.exec_loop imports this module only behind that check.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import subprocess
import sys
from pathlib import Path

from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TaskType
from flwr.supercore.superexec.executor import factory
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

from .procs import die_with_parent

log = logging.getLogger("zk0")
FORK_SERVER = Path(__file__).with_name("app_forks.py")
# The source of flwr 1.42.0's SubprocessExecutor.launch, whose argument builder clientapp_args copies
# (sha256, first 16 hex digits); tests/test_supernode.py checks the copy against the original.
LAUNCH_DIGEST = "83abf3dbe02281fd"
FACTORY_BUILDS = "return SubprocessExecutor()"  # the line of factory.get_executor that builds our class


def seam_problem() -> str | None:
    """Why the Flower installed here is not the one this executor was written against; None when it is."""
    launch = hashlib.sha256(inspect.getsource(SubprocessExecutor.launch).encode()).hexdigest()[:16]
    if launch != LAUNCH_DIGEST:
        return f"SubprocessExecutor.launch is not flwr 1.42.0's (source digest {launch}, expected {LAUNCH_DIGEST})"
    if FACTORY_BUILDS not in inspect.getsource(factory.get_executor):
        return f"the executor factory has no {FACTORY_BUILDS!r}"
    return None


def install() -> None:
    """Make Flower's executor factory build ForkingExecutor where it would build its subprocess executor."""
    factory.SubprocessExecutor = ForkingExecutor


def clientapp_args(spec: ExecutionSpec) -> list[str]:
    """The arguments Flower's executor starts `flwr-clientapp` with for this task."""
    args = [TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type], spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        args += ["--parent-pid", str(spec.parent_pid)]
    return args


class ForkingExecutor(SubprocessExecutor):
    """Flower's subprocess executor, with ClientApps forked from a process that has imported Flower."""

    def __init__(self):
        super().__init__()
        # -P: the file's folder (inside the zk0 package) stays off sys.path; see zk0.deploy.app_forks.
        self.server = subprocess.Popen([sys.executable, "-P", str(FORK_SERVER)], stdin=subprocess.PIPE,
                                       preexec_fn=die_with_parent())

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP or spec.runtime_dependency_install:
            return super().launch(spec)
        request = {"args": clientapp_args(spec), "quiet": spec.suppress_output}
        try:
            if self.server.poll() is not None:
                raise OSError(f"exited with code {self.server.returncode}")
            self.server.stdin.write(json.dumps(request).encode() + b"\n")
            self.server.stdin.flush()
        except OSError as err:
            log.warning("ClientApp fork server unavailable (%s): starting flwr-clientapp the usual way", err)
            return super().launch(spec)
        return LaunchResult.accepted()

    def close(self) -> None:
        if self.server.poll() is None:
            self.server.stdin.close()  # the server ends once its input closes
        super().close()
