"""flower-supernode with a shorter wait between pulls: what `zk0 supernode` and `zk0 local` run as a node.

Flower 1.42's SuperNode loop (flwr/supernode/start_client_internal.py) asks the SuperLink for a message,
and when there is none sleeps a fixed 3 s; while a ClientApp runs it looks for the reply every 0.5 s.
Nodes' loops are out of phase, so a round's train message reaches the last of four nodes 2.25 s after it
was sent in expectation (the largest of four waits spread evenly over 3 s). Here the same loop runs with
every wait of that module capped at POLL_SECONDS, a few cheap requests per second per node. The SuperExec
it starts is zk0's (zk0.deploy.exec_loop: Flower's, with each ClientApp forked from a process that has
already imported Flower). Everything else is Flower's own `flower-supernode`, arguments included. When the
pinned loop is not the one this was written against, nothing is changed and a line says so.
"""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys
import time

log = logging.getLogger("zk0")
POLL_SECONDS = 0.25  # also the SuperExec's task poll (supernode.TASK_POLL) and the ServerApp's (server.grid)
IDLE_WAIT = "time.sleep(3)"  # the line of Flower's loop this shortens
SUPEREXEC = 'command = ["flower-superexec"]'  # and the one whose program it replaces


class _Clock:
    """The `time` module as Flower's SuperNode loop sees it: the same, with each sleep capped."""

    def __init__(self, cap: float):
        self.cap = cap

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


class _Processes:
    """The `subprocess` module as Flower's SuperNode loop sees it: `flower-superexec` is zk0's."""

    def __getattr__(self, name):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(args, *more, **options):  # subprocess's name
        if args and args[0] == "flower-superexec":
            args = [sys.executable, "-m", "zk0.deploy.exec_loop", *args[1:]]
        return subprocess.Popen(args, *more, **options)


def shorten_waits(cap: float = POLL_SECONDS) -> bool:
    """Cap the SuperNode loop's waits at `cap` seconds and start zk0's SuperExec; False (and unchanged)
    when Flower's loop is not the pinned one."""
    from flwr.supernode import start_client_internal as loop

    if isinstance(loop.time, _Clock):
        return True
    source = inspect.getsource(loop.start_client_internal)
    if IDLE_WAIT not in source or SUPEREXEC not in source or loop.time is not time or loop.subprocess is not subprocess:
        log.warning("this Flower's SuperNode loop is not 1.42's (%r, %r): it runs unchanged", IDLE_WAIT, SUPEREXEC)
        return False
    loop.time, loop.subprocess = _Clock(cap), _Processes()
    return True


def main() -> None:
    """`python -m zk0.deploy.node_loop ARGS`: flower-supernode ARGS with the shorter waits."""
    from ..logs import setup_logging

    setup_logging()
    shorten_waits()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv[0] = "flower-supernode"  # Flower's argument parser names itself after argv[0]
    flower_supernode()


if __name__ == "__main__":
    main()
