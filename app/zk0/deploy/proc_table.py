"""The process table of a `zk0 local` SuperNode's ClientApps, read from /proc (standard library only)."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import NamedTuple


class Proc(NamedTuple):
    """What /proc/PID/stat says of one process."""

    ppid: int
    comm: str
    state: str
    exit_status: int


def process_table() -> dict[int, Proc]:
    """Every process's parent, name, state and (for a zombie) wait status, from /proc/PID/stat."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry.name}/stat") as f:
                    data = f.read()
                comm, rest = data[data.index("(") + 1:data.rindex(")")], data[data.rindex(")") + 2:].split()
                table[int(entry.name)] = Proc(int(rest[1]), comm, rest[0], int(rest[49]) if len(rest) > 49 else 0)
    return table


def clientapps(table: dict[int, Proc], supernode: int) -> tuple[int, str]:
    """(live ClientApp processes below this SuperNode, how the last ended one ended, as a clause)."""
    execs = {pid for pid, p in table.items() if p.ppid == supernode and p.comm.startswith("flower-superexe")}
    if not execs:
        return 0, " (and the node's SuperExec, which starts them, is not running)"
    # Flower's SuperExec starts them; zk0's forks them from its fork server (zk0.deploy.app_forks), its child.
    forks = {pid for pid, p in table.items() if p.ppid in execs and p.comm == "zk0-app-forks"}
    apps = [p for p in table.values() if p.ppid in execs | forks and p.comm == "flwr-clientapp"]
    dead = [p.exit_status for p in apps if p.state == "Z"]  # not reaped yet: reaped at the next start
    if not dead:
        return len(apps), ""
    sig = dead[-1] & 0x7F
    how = f"was killed by {signal.Signals(sig).name}" if sig else f"exited with code {dead[-1] >> 8}"
    return len(apps) - len(dead), f" (the last one {how})"
