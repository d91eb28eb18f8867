"""`python -m zk0.deploy.exec_loop ARGS`: flower-superexec ARGS, with zk0's forked ClientApps where they fit.

What the fast loop's SuperNode (zk0.deploy.node_loop) starts as its SuperExec. zk0's executor
(zk0.deploy.fork_executor) leans on private Flower modules; when one of them fails to import, or is
not the one it was written against, this says so in a warning and runs Flower's own SuperExec
unchanged, so a node always runs its ClientApps. Nothing private is imported before that check.
"""

from __future__ import annotations

import logging
import sys

from .app_forks import set_name

log = logging.getLogger("zk0")


def forked_clientapps() -> bool:
    """Install zk0's executor in Flower's factory; False, with a warning, where it cannot be used."""
    try:
        from . import fork_executor

        problem = fork_executor.seam_problem()
    except Exception as err:  # noqa: BLE001 (any failure of the fast path must leave Flower's own running)
        problem = f"{type(err).__name__}: {err}"
    if problem is not None:
        log.warning("SuperExec: Flower's own, ClientApps started as Flower starts them; zk0's forked ClientApps "
                    "are off: %s", problem)
        return False
    fork_executor.install()
    log.info("SuperExec: zk0's, ClientApps forked from a process that has imported Flower")
    return True


def main() -> None:
    """flower-superexec with forked ClientApps, or Flower's own where they cannot be used."""
    from ..logs import setup_logging

    setup_logging()
    set_name(b"flower-superexec")  # the name Flower's own SuperExec has in the process table (zk0.deploy.proc_table)
    forked_clientapps()
    from flwr.supercore.cli.flower_superexec import flower_superexec

    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    main()
