"""A fork server for ClientApp processes: Flower's `flwr-clientapp` imported once, forked per message.

Flower 1.42's SuperExec starts `flwr-clientapp --token T` for every message, and each new process
spends over a second of CPU importing Flower before it asks for its message: on a 2-core host with
four nodes, more CPU per round than the server's evaluation. zk0's SuperExec (zk0.deploy.exec_loop)
starts this program once instead; it imports Flower's `flwr-clientapp` and then, for each line it
reads on standard input (JSON: the arguments Flower would have started `flwr-clientapp` with, and
whether to drop its output), forks a child that runs Flower's `flwr-clientapp` with them. A child is
Flower's ClientApp process in all but its start: same arguments, token and parent watch.

It runs as a file (`python -P app_forks.py`), never as part of the zk0 package: a ClientApp process
must import zk0 from the Flower App it is given, not from wherever this program came from. Only the
standard library is imported here before Flower. It forks from its only thread; like Flower's
executor it reaps ended children at the next start, so an ended ClientApp's status stays readable in
the process table until then (zk0.deploy.proc_table); its children are named `flwr-clientapp`, as
Flower's are. It ends when its input closes (its SuperExec is gone or stopping); running children
finish their message and end on their own.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
import traceback

NAME = b"zk0-app-forks"
PR_SET_NAME = 15


def set_name(name: bytes) -> None:
    """This process's name in the process table (/proc/PID/comm, 15 bytes)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)


def run_child(main, request: dict) -> None:
    """In a forked child: Flower's `flwr-clientapp` with the request's arguments; never returns."""
    code = 1
    try:
        set_name(b"flwr-clientapp")
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)  # the server's requests are not the child's to read
        if request.get("quiet"):
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        sys.argv = ["flwr-clientapp", *request["args"]]
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 (a forked child must never return into the server's loop)
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)


def reap(children: set[int]) -> None:
    for pid in list(children):
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                children.discard(pid)
        except ChildProcessError:
            children.discard(pid)


def serve() -> int:
    set_name(NAME)
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp  # the slow part, once

    children: set[int] = set()
    pending = b""
    while True:
        chunk = os.read(0, 65536)
        if not chunk:
            return 0
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if line.strip():
                request = json.loads(line)
                reap(children)
                sys.stdout.flush()
                sys.stderr.flush()  # else a child would print the parent's unflushed lines again
                pid = os.fork()
                if pid == 0:
                    run_child(flwr_clientapp, request)
                children.add(pid)


if __name__ == "__main__":
    sys.exit(serve())
