"""Shared fixtures: the offline demo built once per test session, always offline."""

from __future__ import annotations

import os

import pytest

# Nothing here reaches the Hugging Face Hub; without this a Hub id retries for ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


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
