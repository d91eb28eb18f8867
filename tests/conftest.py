"""Shared fixtures: the offline demo built once per test session, always offline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiers import is_slow, launches

# Nothing here reaches the Hugging Face Hub; without this a Hub id retries for ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")  # else every Flower process asks api.flower.ai

# Tests run at normal priority: a realtime policy (seen here: SCHED_FIFO 99 on the suite's process)
# is inherited by every child, and Go children (docker, docker-compose) livelock under it.
if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) != os.SCHED_OTHER:
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def pytest_collection_modifyitems(items):
    """The `slow` tier: tests that start federations, Flower servers, zk0 commands or containers (tests/tiers.py)."""
    for item in items:
        if is_slow(item):
            item.add_marker(pytest.mark.slow)


_launched: list[str] = []  # what the running test (its fixtures included) started of tiers.LAUNCHED


def _audit(event: str, args: tuple) -> None:
    if event == "subprocess.Popen" and (name := launches(args[1])):
        _launched.append(name)


sys.addaudithook(_audit)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _launched.clear()  # before any fixture of this test is set up


@pytest.fixture(autouse=True)
def _fast_tests_start_no_federation(request):
    """A test that tiers.py did not find slow and that starts a federation program fails, naming it."""
    yield
    if _launched and request.node.get_closest_marker("slow") is None:
        pytest.fail(f"{request.node.nodeid} started {', '.join(sorted(set(_launched)))} but is not in the slow tier: "
                    "let it use a helper tests/tiers.py knows (SLOW_NAMES), or mark it @pytest.mark.slow")


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The offline demo (four node datasets, server eval set, tiny base policy)."""
    from zk0.demo import write_demo

    return write_demo(tmp_path_factory.mktemp("demo"), episodes=6, frames=30, seed=0)


@pytest.fixture(scope="session")
def foreign(tmp_path_factory):
    """Datasets shaped like ones we did not write, each with the camera map it needs.

    A single `top` camera at 15 fps with 64x48 frames, a `laptop`+`phone` set, a LeRobot v2.1 set at
    20 fps, and an evaluation set whose cameras have yet other names.
    """
    from zk0.demo import ARM, NODE_TASKS, SCENE, DemoSet, make_synthetic_dataset, write_eval_set

    root = tmp_path_factory.mktemp("foreign")
    sets = {
        "top15": (DemoSet({"top": SCENE}, fps=15, image_size=(48, 64)), "top=camera1"),
        "laptop-phone": (DemoSet({"laptop": SCENE, "phone": ARM}), "laptop=camera1,phone=camera2"),
        "v21": (DemoSet({"up": SCENE, "wrist": ARM}, fps=20, version="v2.1"), "up=camera1,wrist=camera2"),
    }
    out = {"datasets": {}, "cameras": {}}
    for style, (name, (spec, cameras)) in enumerate(sets.items()):
        make_synthetic_dataset(root / name, f"lab/{name}", task=NODE_TASKS[style], style=style, num_episodes=5,
                               frames_per_episode=24, spec=spec, seed=7)
        out["datasets"][name], out["cameras"][name] = root / name, cameras
    write_eval_set(root / "eval", 1, 24, seed=7, spec=DemoSet({"overhead": SCENE, "gripper": ARM}), styles=3)
    out["datasets"]["eval"], out["cameras"]["eval"] = root / "eval", "overhead=camera1,gripper=camera2"
    return out


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


@pytest.fixture
def owner():
    """A process standing in for Flower's SuperExec: warm workers belong to it. Any worker still
    serving it when the test ends is ended too, so no test leaves one behind."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()
    proc.wait()
    needle = f"--owner-pid\0{proc.pid}\0".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue
