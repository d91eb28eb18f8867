"""Camera maps: which of a dataset's cameras feeds which of the policy's image slots (no heavy imports).

A map is written `top=camera1,wrist=camera2` (short names) or with full feature keys; it becomes the
`rename_map` of LeRobot's `rename_observations_processor` step, as `lerobot-train --rename_map` does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

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


class CameraMap(Mapping[str, str]):
    """A camera map parsed once where it enters (an env-file, a Flower config): full dataset key -> full policy
    key, the `rename_map` LeRobot takes as it is; str() is its canonical short form, which is what travels."""

    def __init__(self, mapping: Mapping[str, str] | None = None):
        self._map = dict(mapping or {})

    @classmethod
    def parse(cls, text: str | None) -> CameraMap:
        """`top=camera1,wrist=camera2` (or full keys) as a map; ValueError names what is wrong."""
        return cls(parse_camera_map(text))

    def __getitem__(self, key: str) -> str:
        return self._map[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __hash__(self) -> int:
        return hash(tuple(self._map.items()))

    def __str__(self) -> str:
        return format_camera_map(self._map)

    def __repr__(self) -> str:
        return f"CameraMap({str(self)!r})"

    @classmethod
    def _validate(cls, value: object) -> CameraMap | None:
        """A settings field's value: a map as it is, a string parsed, an empty one None."""
        if value is None or isinstance(value, CameraMap):
            return value or None
        if not isinstance(value, str):
            raise ValueError(f"a camera map is text such as top=camera1,wrist=camera2, not {type(value).__name__}")
        return cls.parse(value) or None

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        """As a settings field: validated by parsing, written (env, Flower config, JSON) in its short form."""
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(
            cls._validate, serialization=core_schema.plain_serializer_function_ser_schema(str)
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema, handler) -> dict:
        return {"type": "string", "examples": ["top=camera1,wrist=camera2"]}


def format_camera_map(mapping: Mapping[str, str]) -> str:
    """The inverse of parse_camera_map, in short names."""
    return ",".join(f"{short_name(k)}={short_name(v)}" for k, v in mapping.items())


def match_cameras(
    cameras: list[str], slots: list[str], rename: Mapping[str, str] | None
) -> tuple[dict[str, str], list[str]]:
    """(dataset camera -> policy slot for every camera that feeds one, problems) after applying `rename`."""
    problems, rename = [], rename or {}
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
