"""Shared fixtures: the offline demo built once per test session, always offline."""

from __future__ import annotations

import os

import pytest

# Nothing here reaches the Hugging Face Hub; without this a Hub id retries for ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# Tests run at normal priority: a realtime policy (seen here: SCHED_FIFO 99 on the suite's process)
# is inherited by every child, and Go children (docker, docker-compose) livelock under it.
if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) != os.SCHED_OTHER:
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The offline demo (four node datasets, server eval set, tiny base policy)."""
    from zk0.demo import write_demo

    return write_demo(tmp_path_factory.mktemp("demo"), episodes=6, frames=30, seed=0)


@pytest.fixture(autouse=True)
def _no_zk0_env(monkeypatch):
    """Each test starts without ZK0_ variables from the developer's shell."""
    for name in list(os.environ):
        if name.startswith("ZK0_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def finished_run(demo, tmp_path_factory):
    """One three-round demo federation with `zk0 local`, shared by the tests that inspect it."""
    from federation import run_zk0, write_env

    tmp = tmp_path_factory.mktemp("local")
    out = tmp / "out"
    res = run_zk0("local", "--env-file", str(write_env(tmp / "demo.env", demo, out)))
    return res, out
