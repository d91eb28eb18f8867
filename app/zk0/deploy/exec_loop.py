"""Flower's SuperExec, with ClientApp processes forked from one that has imported Flower: a zk0 node's SuperExec.

Flower 1.42's subprocess executor starts `flwr-clientapp --token T` for every message; each start
imports Flower again (1.1-1.3 s measured alone on an idle 2-core host), four at once on a 4-node
host, every round. This executor
starts one fork server when it is built (zk0.deploy.app_forks: Flower's `flwr-clientapp`, imported
once) and hands it each ClientApp task's arguments; the server forks a child that runs Flower's
`flwr-clientapp` with them, in milliseconds. Tasks other than ClientApps, tasks that install runtime
dependencies, and any task the fork server cannot take (it died, say) go through Flower's own
executor unchanged. The fork server dies with this process (parent-death signal), and its input
closes when this process ends.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TaskType
from flwr.supercore.superexec.executor import factory
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

from .app_forks import set_name
from .procs import die_with_parent

log = logging.getLogger("zk0")
FORK_SERVER = Path(__file__).with_name("app_forks.py")


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


def main() -> None:
    """`python -m zk0.deploy.exec_loop ARGS`: flower-superexec ARGS with forked ClientApps."""
    from flwr.supercore.cli.flower_superexec import flower_superexec

    from ..logs import setup_logging

    setup_logging()
    set_name(b"flower-superexec")  # the name Flower's own SuperExec has in the process table (zk0.deploy.proc_table)
    factory.SubprocessExecutor = ForkingExecutor  # what Flower's factory builds for subprocess execution
    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    main()
