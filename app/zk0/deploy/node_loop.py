"""flower-supernode with a shorter wait between pulls: the fast loop `zk0 local` runs its nodes with.

Flower 1.42's SuperNode loop (flwr/supernode/start_client_internal.py) asks the SuperLink for a message,
and when there is none sleeps a fixed 3 s; while a ClientApp runs it looks for the reply every 0.5 s.
Nodes' loops are out of phase, so a round's train message reaches the last of four nodes 2.25 s after it
was sent in expectation (the largest of four waits spread evenly over 3 s). Here the same loop runs with
every wait of that module capped at POLL_SECONDS, a few cheap requests per second per node. The SuperExec
it starts is zk0's (zk0.deploy.exec_loop: Flower's, with each ClientApp forked from a process that has
already imported Flower). Everything else is Flower's own `flower-supernode`, arguments included. When the
pinned loop is not the one this was written against (or cannot be imported), nothing is changed and a
warning says so. `zk0 supernode` runs Flower's own `flower-supernode` unless given --fast-loop.
"""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys
import time

log = logging.getLogger("zk0")
FAST = "SuperNode: zk0 fast loop (0.25 s polls, forked ClientApps)"
OWN = "SuperNode: Flower's own loop"
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


def loop_problem(loop) -> str | None:
    """Why Flower's SuperNode loop module is not the one the fast loop was written against; None when it is."""
    try:
        source = inspect.getsource(loop.start_client_internal)
    except (AttributeError, OSError, TypeError) as err:
        return f"its source cannot be read ({type(err).__name__}: {err})"
    if IDLE_WAIT not in source or SUPEREXEC not in source:
        return f"it is not 1.42's (no {IDLE_WAIT!r} or no {SUPEREXEC!r})"
    if getattr(loop, "time", None) is not time or getattr(loop, "subprocess", None) is not subprocess:
        return "its time or subprocess module is not the standard library's"
    return None


def shorten_waits(cap: float = POLL_SECONDS) -> bool:
    """Cap the SuperNode loop's waits at `cap` seconds and start zk0's SuperExec; False (and unchanged,
    with a warning naming why) when Flower's loop is not the pinned one or cannot be imported."""
    try:
        from flwr.supernode import start_client_internal as loop
    except ImportError as err:
        problem = f"it cannot be imported ({err})"
    else:
        if isinstance(loop.time, _Clock):
            return True
        problem = loop_problem(loop)
    if problem is not None:
        log.warning("%s, unchanged: the fast loop does not fit this Flower's SuperNode loop: %s", OWN, problem)
        return False
    loop.time, loop.subprocess = _Clock(cap), _Processes()
    return True


def main() -> None:
    """`python -m zk0.deploy.node_loop ARGS`: flower-supernode ARGS with the shorter waits."""
    from ..logs import setup_logging

    setup_logging()
    if shorten_waits():
        log.info(FAST)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv[0] = "flower-supernode"  # Flower's argument parser names itself after argv[0]
    flower_supernode()


if __name__ == "__main__":
    main()
