"""Every dataset of an experiment against the base policy, before any process starts (JSON files only).

`zk0 check`, `zk0 local`, `zk0 submit` and `zk0 supernode` run these checks through zk0.deploy.preflight and
refuse to start with every problem listed at once; a node runs them again on the dataset it opens.
Nothing here imports torch or LeRobot, so a refusal takes about a second. `local_path` (zk0.hub) is the one
rule for "local folder or Hub id"; a Hub id's JSON files are read through the Hub cache, so a missing, private
or unreachable repo is refused here with what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .cameras import IMAGE_PREFIX, match_cameras, parse_camera_map, short_name, suggest_map
from .errors import DatasetError
from .hub import HubError, local_path, read_file

SUPPORTED = "v3.0"
CONVERTIBLE = "v2.1"
# What `lerobot/smolvla_base` reads (its config.json), for checking offline where the Hub is out of reach.
KNOWN_LAYOUTS = {
    "lerobot/smolvla_base": ([f"{IMAGE_PREFIX}camera{i}" for i in (1, 2, 3)], 6, 6),
}


def is_local(spec: str) -> bool:
    """Whether the spec names a local folder rather than a Hub id (see local_path)."""
    return local_path(spec) is not None


def absolute_spec(spec: str | None) -> str | None:
    """A local spec as an absolute path, for a process in another working directory; a Hub id as it is."""
    path = local_path(spec)
    return str(path.resolve()) if path is not None else spec


def read_json(spec: str, filename: str, repo_type: str, setting: str = "") -> dict:
    """`filename` of a local folder or a Hub repo at its revision (through the Hub cache); OSError when a
    local one cannot be read, HubError (naming `setting` and what to do) when a Hub one cannot."""
    path = local_path(spec)
    return json.loads((path / filename if path is not None else read_file(spec, filename, repo_type, setting))
                      .read_text())


@dataclass
class PolicyLayout:
    """What the base policy reads and writes."""

    source: str
    slots: list[str]
    state_dim: int | None
    action_dim: int | None

    @classmethod
    def from_features(cls, source: str, inputs: dict, outputs: dict) -> PolicyLayout:
        """From a policy config's input/output features (dicts of {type, shape} or PolicyFeature objects)."""
        def kind(f):
            return str(f["type"] if isinstance(f, dict) else f.type.value).upper()

        def dim(f):
            return int(list(f["shape"] if isinstance(f, dict) else f.shape)[0])

        state = inputs.get("observation.state")
        return cls(
            source,
            sorted(k for k, f in inputs.items() if kind(f).endswith("VISUAL")),
            dim(state) if state is not None else None,
            dim(outputs["action"]) if "action" in outputs else None,
        )


def policy_layout(base: str, setting: str = "ZK0_BASE_POLICY") -> tuple[PolicyLayout | None, str | None]:
    """(the base policy's layout, None) or (None, the problem)."""
    try:
        config = read_json(base, "config.json", "model", setting)
    except (OSError, ValueError) as err:
        if base in KNOWN_LAYOUTS:  # known without the Hub; the run's download refuses what cannot be read
            return PolicyLayout(base, *KNOWN_LAYOUTS[base]), None
        if isinstance(err, HubError):
            return None, str(err)
        return None, (f"{setting}={base}: no saved policy there (missing config.json); run `zk0 demo` for the "
                      "offline demo, or use a Hub id such as lerobot/smolvla_base where the Hub is reachable")
    return PolicyLayout.from_features(base, config.get("input_features", {}), config.get("output_features", {})), None


@dataclass
class DatasetCheck:
    """One dataset's row of the check table, with its problems and warnings."""

    role: str  # node-0, eval, or a SuperNode's name
    spec: str
    setting: str  # the variable the dataset came from
    cameras_setting: str  # the variable its camera map comes from
    version: str = "?"
    fps: int | None = None
    episodes: int | None = None
    frames: int | None = None
    cameras: list[str] = field(default_factory=list)
    fed: dict[str, str] = field(default_factory=dict)
    state_dim: int | None = None
    action_dim: int | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.problems.append(f"{self.role} ({self.setting}={self.spec}): {text}")

    def warn(self, text: str) -> None:
        self.warnings.append(f"{self.role} ({self.setting}={self.spec}): {text}")

    @property
    def verdict(self) -> str:
        if self.problems:
            return f"FAIL ({len(self.problems)})"
        return "ok, converted on open" if self.version == CONVERTIBLE else "ok"


def _dim(features: dict, key: str) -> int | None:
    shape = features.get(key, {}).get("shape")
    return int(shape[0]) if shape else None


def _check_version(row: DatasetCheck, version: str) -> None:
    if version.startswith("v3.") or version == CONVERTIBLE:
        return  # LeRobot reads every v3 minor version (with a warning for newer ones)
    if version.startswith("v2"):
        todo = ("convert it to v2.1 with LeRobot 0.3.x (`python -m lerobot.datasets.v21.convert_dataset_v20_to_v21 "
                f"--repo-id ... --root {row.spec}`); zk0 then converts v2.1 to v3.0 by itself")
    else:
        todo = ("convert it with an older LeRobot release (v1.x -> v2.0 -> v2.1: LeRobot 0.3.x's converters); "
                "zk0 then converts v2.1 to v3.0 by itself")
    row.problem(f"LeRobot dataset format {version}, which LeRobot 0.6.1 cannot read: {todo}")


def check_dataset(
    role: str, spec: str, setting: str, cameras_setting: str, camera_map: str | None, policy: PolicyLayout | None,
    *, heldout: int = 0, partitions: int | None = None, heldout_setting: str = "",
) -> DatasetCheck:
    """Check one dataset's format, cameras (after the map), state/action sizes and episode split."""
    row = DatasetCheck(role, spec, setting, cameras_setting)
    try:
        info = read_json(spec, "meta/info.json", "dataset", setting)
    except HubError as err:
        row.problem(err.reason)
        return row
    except (OSError, ValueError):
        row.problem(f"no LeRobot dataset there (missing or unreadable meta/info.json); point {setting} at a "
                    "dataset root (the folder holding meta/info.json) or a Hub id")
        return row
    features = info.get("features", {})
    row.version = str(info.get("codebase_version", "unknown"))
    row.fps, row.episodes, row.frames = info.get("fps"), info.get("total_episodes"), info.get("total_frames")
    row.cameras = [
        k for k, f in features.items() if f.get("dtype") in ("video", "image") and k.startswith(IMAGE_PREFIX)
    ]
    row.state_dim, row.action_dim = _dim(features, "observation.state"), _dim(features, "action")
    _check_version(row, row.version)
    if policy is not None:
        _check_cameras(row, camera_map, policy)
        sizes = (("state", row.state_dim, policy.state_dim), ("action", row.action_dim, policy.action_dim))
        for name, got, want in sizes:
            if want is not None and got != want:
                row.problem(f"{name} has {got or 'no'} values, the policy expects {want}; use a dataset recorded "
                            "with the same arm (SO-100/SO-101: 6 joints)")
    episodes = (row.episodes or 0) // (partitions or 1)
    if heldout >= episodes:
        row.problem(
            f"holding out {heldout} of its {episodes} episodes leaves nothing to train on; lower {heldout_setting}"
        )
    return row


def _check_cameras(row: DatasetCheck, camera_map: str | None, policy: PolicyLayout) -> None:
    try:
        rename = parse_camera_map(camera_map)
    except ValueError as err:
        row.problem(f"{row.cameras_setting}={camera_map}: {err}")
        return
    row.fed, problems = match_cameras(row.cameras, policy.slots, rename)
    if problems:
        slots = ", ".join(short_name(s) for s in policy.slots)
        cams = ", ".join(short_name(c) for c in row.cameras) or "none"
        row.problem(
            f"{'; '.join(problems)} (dataset cameras: {cams}; policy slots: {slots}). Map them, e.g.:\n"
            f"    {row.cameras_setting}={suggest_map(row.cameras, policy.slots)}"
        )
    elif unused := [short_name(c) for c in row.cameras if c not in row.fed]:
        row.warn(f"cameras {', '.join(unused)} feed no policy slot and are not used")


def fps_warnings(rows: list[DatasetCheck]) -> list[str]:
    """One line when the datasets' frame rates differ (allowed: each node's action chunk follows its own fps)."""
    rates = {r.role: r.fps for r in rows if r.fps}
    if len(set(rates.values())) > 1:
        listed = ", ".join(f"{role} {fps}" for role, fps in rates.items())
        return [
            f"datasets have different fps ({listed}): each one's action chunk spans chunk_size frames at its own rate"
        ]
    return []


def table(rows: list[DatasetCheck]) -> str:
    """The check table: one line per dataset."""
    head = ("node", "dataset", "format", "fps", "episodes/frames", "cameras -> slots", "state/action", "verdict")
    lines = [head]
    for r in rows:
        cams = ", ".join(f"{short_name(c)}->{short_name(s)}" for c, s in r.fed.items()) or "-"
        if unused := [short_name(c) for c in r.cameras if c not in r.fed]:
            cams += f" (unused: {', '.join(unused)})"
        lines.append((r.role, r.spec, r.version, str(r.fps or "?"), f"{r.episodes or '?'}/{r.frames or '?'}", cams,
                      f"{r.state_dim or '?'}/{r.action_dim or '?'}", r.verdict))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)


class CheckFailed(DatasetError):
    """One or more datasets cannot be used; the message lists every problem."""


def raise_problems(problems: list[str], what: str = "the experiment", error: type[Exception] = CheckFailed) -> None:
    """Raise `error` listing every problem, numbered, when there is any."""
    if problems:
        listed = "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
        raise error(f"{what} cannot start, {len(problems)} problem(s):\n{listed}")


def node_variable(prefix: str, field: str, env: dict[str, str] | None) -> str:
    """The variable a node's setting came from: its own (prefix + FIELD) or, when only that is set, the
    generic ZK0_<FIELD> that applies to every node."""
    own, generic = f"{prefix}{field}", f"ZK0_{field}"
    return generic if env is not None and not env.get(own) and env.get(generic) else own


def check_nodes(
    nodes: list, base_policy: str, prefixes: list[str], env: dict[str, str] | None = None
) -> tuple[list[DatasetCheck], list[str]]:
    """Check each node's dataset (NodeSettings) against its base policy; `prefixes[i]` names its variables
    (or, given `env`, the generic ZK0_<FIELD> where the node has no variable of its own)."""
    rows, problems, layouts = [], [], {}
    for node, prefix in zip(nodes, prefixes, strict=True):
        base = node.base_policy or base_policy
        if base not in layouts:
            layouts[base] = policy_layout(base, node_variable(prefix, "BASE_POLICY", env) if node.base_policy
                                          else "ZK0_BASE_POLICY")
            problems += [layouts[base][1]] if layouts[base][1] else []
        dataset, cameras, heldout = (node_variable(prefix, f, env) for f in ("DATASET", "CAMERAS", "HELDOUT_EPISODES"))
        rows.append(check_dataset(
            node.display_name, node.dataset, dataset, cameras, node.cameras, layouts[base][0],
            heldout=node.heldout_episodes, partitions=node.num_partitions, heldout_setting=heldout,
        ))
    return rows, problems


def check_experiment(
    settings, nodes: list, prefixes: list[str] | None = None, env: dict[str, str] | None = None
) -> tuple[list[DatasetCheck], list[str], list[str]]:
    """(rows, problems, warnings) for an experiment's nodes (NodeSettings) and its evaluation set (ServerSettings)."""
    prefixes = prefixes or [f"ZK0_NODE_{i}_" for i in range(len(nodes))]
    rows, problems = check_nodes(nodes, settings.base_policy, prefixes, env)
    if settings.eval_dataset:
        policy, problem = policy_layout(settings.base_policy)
        if problem and problem not in problems:
            problems.append(problem)
        rows.append(check_dataset(
            "eval", settings.eval_dataset, "ZK0_EVAL_DATASET", "ZK0_EVAL_CAMERAS", settings.eval_cameras, policy
        ))
    problems += [p for r in rows for p in r.problems]
    warnings = [w for r in rows for w in r.warnings] + fps_warnings([r for r in rows if r.role != "eval"])
    return rows, problems, warnings
