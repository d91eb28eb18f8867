"""The simulated labs: what each records (task, cameras, fps, frame size, block colour and range, lighting).

Pure data, no simulator import: settings and `zk0 check` read it without MuJoCo. Labs differ as real
SO-100/SO-101 labs do: their task, how many cameras they have and what they call them, where those
cameras stand, their frame rate and frame size, the object and the room's light.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Where a camera looks from: (azimuth deg, elevation deg, distance m); "wrist" rides on the gripper.
VIEWS = {
    "front": (180.0, -30.0, 0.55),
    "overhead": (180.0, -80.0, 0.55),
    "left": (135.0, -35.0, 0.50),
    "right": (225.0, -25.0, 0.45),
    "side": (90.0, -25.0, 0.55),
    "wrist": (180.0, -60.0, 0.18),
}
# Seconds an episode may last, per task: about twice what the scripted expert needs.
TASK_SECONDS = {"lift": 6.0, "place": 9.0}
TASKS = tuple(TASK_SECONDS)
# Recording draws episode seeds from [0, 10^6); evaluation from [10^6, ...): never the same scene.
EVAL_SEED_BASE = 1_000_000


@dataclass(frozen=True)
class Lab:
    """One simulated lab: a task and how the lab records it."""

    name: str
    task: str  # "lift": pick the block up and hold it; "place": carry it to the lab's fixed target
    instruction: str  # the task string written with every frame
    cameras: dict = field(default_factory=dict)  # dataset camera name -> view (a VIEWS key)
    fps: int = 10
    image_size: tuple[int, int] = (64, 64)  # (height, width)
    block_rgba: tuple[float, float, float, float] = (0.8, 0.15, 0.15, 1.0)
    # Block centre sampled uniformly in [x_lo, x_hi] x [y_lo, y_hi] metres (the arm reaches x < 0.30).
    block_range: tuple[float, float, float, float] = (0.22, 0.26, -0.03, 0.03)
    light: float = 1.0  # scale of the scene lights' diffuse colour
    version: str = "v3.0"  # LeRobot dataset format the lab records in

    @property
    def max_steps(self) -> int:
        return round(TASK_SECONDS[self.task] * self.fps)

    @property
    def camera_map(self) -> str:
        """Scene cameras first onto camera1.., the wrist camera last, as `zk0 check` suggests."""
        ordered = sorted(self.cameras, key=lambda name: self.cameras[name] == "wrist")
        return ",".join(f"{name}=camera{i}" for i, name in enumerate(ordered, start=1))


LABS = {
    lab.name: lab
    for lab in (
        Lab("lift-top", "lift", "pick up the red cube", {"top": "overhead", "wrist": "wrist"}, fps=10),
        Lab("lift-front", "lift", "pick up the green cube", {"front": "front"}, fps=15,
            block_rgba=(0.15, 0.7, 0.2, 1.0), block_range=(0.21, 0.27, -0.05, 0.05), light=0.7),
        Lab("place-laptop", "place", "put the blue cube on the target", {"laptop": "left", "phone": "right"},
            fps=10, image_size=(60, 80), block_rgba=(0.15, 0.3, 0.85, 1.0), block_range=(0.24, 0.27, -0.02, 0.02),
            light=1.2),
        Lab("lift-up", "lift", "lift the yellow block", {"up": "front", "side": "side"}, fps=10,
            block_rgba=(0.9, 0.8, 0.1, 1.0), block_range=(0.20, 0.25, -0.04, 0.02), version="v2.1"),
    )
}


def parse_labs(value: str | None, setting: str = "--labs") -> list[Lab]:
    """Comma-separated lab names (e.g. `lift-top,lift-front`) -> labs; all of them when empty."""
    if not value:
        return list(LABS.values())
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in LABS]
    if unknown:
        raise ValueError(f"{setting}: unknown lab(s) {', '.join(unknown)}; known: {', '.join(LABS)}")
    return [LABS[n] for n in names]
