"""Camera maps: which of a dataset's cameras feeds which of the policy's image slots (no heavy imports).

A map is written `top=camera1,wrist=camera2` (short names) or with full feature keys; it becomes the
`rename_map` of LeRobot's `rename_observations_processor` step, as `lerobot-train --rename_map` does.
"""

from __future__ import annotations

import re

IMAGE_PREFIX = "observation.images."
_ENTRY = re.compile(r"^[\w.-]+$")
# Cameras that look at the gripper go after the scene cameras, as in LeRobot's SmolVLA examples
# (top -> camera1, wrist -> camera2).
_CLOSE_UP = ("wrist", "gripper", "hand")


def full_key(name: str) -> str:
    """`top` -> `observation.images.top`; a full key stays as it is."""
    return name if name.startswith(IMAGE_PREFIX) else IMAGE_PREFIX + name


def short_name(key: str) -> str:
    """`observation.images.top` -> `top`."""
    return key.removeprefix(IMAGE_PREFIX)


def parse_camera_map(value: str | None) -> dict[str, str]:
    """`top=camera1, wrist=camera2` -> full dataset key -> full policy key; ValueError names what is wrong."""
    if not value or not value.strip():
        return {}
    mapping: dict[str, str] = {}
    for entry in value.split(","):
        source, sep, target = (part.strip() for part in entry.partition("="))
        if not sep or not _ENTRY.match(source) or not _ENTRY.match(target):
            raise ValueError(f"camera map entry {entry.strip()!r} is not DATASET_CAMERA=POLICY_SLOT (e.g. top=camera1)")
        if full_key(source) in mapping:
            raise ValueError(f"camera {source!r} is mapped twice")
        mapping[full_key(source)] = full_key(target)
    targets = list(mapping.values())
    if twice := sorted({short_name(t) for t in targets if targets.count(t) > 1}):
        raise ValueError(f"two cameras map onto the same slot {', '.join(twice)}")
    return mapping


def format_camera_map(mapping: dict[str, str]) -> str:
    """The inverse of parse_camera_map, in short names."""
    return ",".join(f"{short_name(k)}={short_name(v)}" for k, v in mapping.items())


def match_cameras(cameras: list[str], slots: list[str], rename: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(dataset camera -> policy slot for every camera that feeds one, problems) after applying `rename`."""
    problems = []
    if missing := [short_name(k) for k in rename if k not in cameras]:
        problems.append(f"the camera map names {', '.join(missing)}, which the dataset lacks")
    if unknown := [short_name(v) for v in rename.values() if v not in slots]:
        problems.append(f"the camera map targets {', '.join(unknown)}, which the policy has no slot for")
    fed = {}
    for camera in cameras:
        target = rename.get(camera, camera)
        if target in slots:
            fed[camera] = target
    if not fed and not problems:
        problems.append("none of its cameras feeds a policy slot")
    return fed, problems


def suggest_map(cameras: list[str], slots: list[str]) -> str:
    """A ready-to-paste map: scene cameras first, close-up cameras last, onto the slots in order."""
    ordered = sorted(cameras, key=lambda c: any(word in short_name(c) for word in _CLOSE_UP))
    return format_camera_map(dict(zip(ordered, sorted(slots), strict=False)))
