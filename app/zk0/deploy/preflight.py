"""The one preflight of `zk0 check`, `zk0 local`, `zk0 submit` and `zk0 supernode`: the settings an
env-file (under the environment) describes, read and checked before any process starts.

Unknown variables, invalid values and unusable datasets are collected, each naming its variable and
its env-file line, and refused at once in one SettingsError (exit 2). Nothing here imports torch,
LeRobot or Flower, so a refusal takes about a second.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

from dotenv import dotenv_values

from ..attacks import ENV as TEST_ATTACK
from ..attacks import parse_attacks
from ..cameras import CameraMap
from ..check import (
    absolute_spec,
    check_experiment,
    check_nodes,
    fps_warnings,
    local_path,
    node_variable,
    raise_problems,
    table,
)
from ..hub import HubError, pin
from ..settings import NodeSettings, ServerSettings, SettingsError
from ..settings_names import NODE_VAR, check_env_names

# What a node trains when neither it nor the server has said yet (the server's base policy arrives
# with the first message): its dataset is checked against this layout.
DEFAULT_BASE = ServerSettings.model_fields["base_policy"].default
Role = Literal["experiment", "server", "node"]
# The server settings its evaluation set's check reads.
EVAL_VARS = ("ZK0_BASE_POLICY", "ZK0_EVAL_DATASET", "ZK0_EVAL_CAMERAS")


def read_env_file(env_file: Path | None) -> dict[str, str]:
    """The env-file's variables (none without a file)."""
    if env_file is None:
        return {}
    if env_file.is_dir():
        raise SettingsError(f"env-file {env_file} is a directory; pass a file such as experiments/demo.env")
    if not env_file.is_file():
        raise SettingsError(f"env-file {env_file} does not exist; pass a file such as experiments/demo.env")
    return {k: v for k, v in dotenv_values(env_file).items() if v is not None}


def settings_from_env(cls, env: dict[str, str]):
    """Build a settings class from a variables mapping rather than this process's environment."""
    names = {f: f"ZK0_{f.upper()}" for f in cls.model_fields}
    return cls.load(**{f: env[name] for f, name in names.items() if name in env})


def node_settings_from_env(
    env: dict[str, str], only: int | None = None
) -> tuple[list[NodeSettings], list[str], list[str]]:
    """(one NodeSettings per ZK0_NODE_<i>_* group, or group `only`; their variable prefixes; the problems).

    A node's own variables outrank the generic ZK0_<FIELD> ones, which apply to every node whether the
    env-file or the shell sets them (compose.cpu.yaml sets them for every node); a problem names the
    variable it came from.
    """
    groups: dict[int, dict[str, str]] = {} if only is None else {only: {}}
    for name, value in env.items():
        if (match := NODE_VAR.match(name)) and (only is None or int(match.group(1)) == only):
            group = groups.setdefault(int(match.group(1)), {})
            if value != "":  # empty means unset, as Compose passes `${ZK0_NODE_0_NAME:-}`
                group[match.group(2).lower()] = value
    if not groups:
        return [], [], ["no nodes configured: set ZK0_NODE_0_DATASET (and _1, _2, ...) in the env-file"]
    # The shell's generic variables reach NodeSettings through this process's environment; the env-file's
    # only through `env`. A node's name defaults to node-<i> over a generic ZK0_NAME, as it always has.
    generic = {f: env[f"ZK0_{f.upper()}"] for f in NodeSettings.model_fields if env.get(f"ZK0_{f.upper()}")}
    nodes, prefixes, problems = [], [], []
    for index in sorted(groups):
        try:
            nodes.append(_home_expanded(NodeSettings.load(**{**generic, "name": f"node-{index}", **groups[index]})))
            prefixes.append(f"ZK0_NODE_{index}_")
        except SettingsError as err:  # it names ZK0_<FIELD>: name the node's own variable instead
            text = str(err)
            for name in NodeSettings.model_fields:
                if name in groups[index] or name not in generic:
                    text = text.replace(f"ZK0_{name.upper()} (", f"ZK0_NODE_{index}_{name.upper()} (")
            problems.append(f"node {index}: {text}")
    return nodes, prefixes, problems


def _home_expanded(node: NodeSettings) -> NodeSettings:
    """`~` expanded in the node's paths before they travel as --node-config; other specs as given."""
    updates = {}
    for name in ("dataset", "base_policy", "cache_dir"):
        value = getattr(node, name)
        if value is not None and str(value).startswith("~"):
            updates[name] = type(value)(local_path(str(value)))
    return node.model_copy(update=updates) if updates else node


def absolute_paths(settings: ServerSettings) -> ServerSettings:
    """The settings with local paths absolute: the ServerApp runs in another working directory."""
    return settings.model_copy(update={
        "base_policy": absolute_spec(settings.base_policy), "eval_dataset": absolute_spec(settings.eval_dataset),
        "output_dir": settings.output_dir.expanduser().resolve(),
    })


def absolute_node_paths(node: NodeSettings) -> NodeSettings:
    """The node with local paths absolute, for virtual nodes that run in the simulation's working directory."""
    updates = {"dataset": absolute_spec(node.dataset), "base_policy": absolute_spec(node.base_policy)}
    if node.cache_dir:
        updates["cache_dir"] = node.cache_dir.expanduser().resolve()
    return node.model_copy(update=updates)


@dataclass
class Experiment:
    """What passed the preflight: the variables, the server's settings (not for a node), the nodes."""

    env: dict[str, str]
    settings: ServerSettings | None = None
    nodes: list[NodeSettings] = field(default_factory=list)


def preflight(
    env_file: Path | None, role: Role = "experiment", index: int | None = None, echo=print, download: bool = False
) -> Experiment:
    """Read and check what `role` needs, print the check table; raise SettingsError listing every problem.
    With `download` (`zk0 local`, `zk0 supernode`), then fetch every Hub repo it names (see `download_hub`).

    experiment (`zk0 check`, `zk0 local`): the server's settings and every ZK0_NODE_<i>_* node.
    server (`zk0 submit`): the server's settings and its evaluation set.
    node (`zk0 supernode`): one node, from ZK0_NODE_<index>_* or, without an index, ZK0_<FIELD>.
    """
    values = read_env_file(env_file)
    problems: list[str] = []
    try:
        check_env_names(set(values) | {k for k in os.environ if k.startswith("ZK0_")})
    except SettingsError as err:
        problems.append(str(err))
    env = {**values, **os.environ}
    found = Experiment(env)
    server_problem = ""
    if role != "node":
        try:
            found.settings = absolute_paths(settings_from_env(ServerSettings, env))
        except SettingsError as err:
            server_problem = str(err)
            problems.append(server_problem)
    found.nodes, prefixes, node_problems = _nodes(env, role, index)
    problems += node_problems + _attack_problems(env, found.nodes, role)
    rows, dataset_problems, warnings = _check(found, prefixes, role, server_problem)
    echo(table(rows))
    for warning in warnings:
        echo(f"warning: {warning}")
    problems += [p for p in dataset_problems if p not in problems]
    what = "this SuperNode" if role == "node" else "the experiment"
    raise_problems([_with_lines(p, env_file, values) for p in problems], what, SettingsError)
    if download:
        hub_problems = download_hub(found, prefixes, echo)
        raise_problems([_with_lines(p, env_file, values) for p in hub_problems], what, SettingsError)
    return found


def _attack_problems(env: dict[str, str], nodes: list[NodeSettings], role: Role) -> list[str]:
    """ZK0_TEST_ATTACK (zk0.attacks, a testing hook): a malformed value, or one naming none of `zk0 local`'s nodes."""
    if not env.get(TEST_ATTACK, "").strip():
        return []
    try:
        attacks = parse_attacks(env[TEST_ATTACK])
    except ValueError as err:
        return [str(err)]
    names = [n.display_name for n in nodes]
    unknown = sorted({a.node for a in attacks} - set(names)) if role == "experiment" and names else []
    return [f"{TEST_ATTACK}={env[TEST_ATTACK]!r} names node(s) {', '.join(unknown)}, none of this experiment's "
            f"({', '.join(names)})"] if unknown else []


def download_hub(found: Experiment, prefixes: list[str], echo=print) -> list[str]:
    """Download (or resume, or reuse from the Hub cache) every Hub repo of `found`, before any process starts,
    and pin each spec to the commit it got (owner/name@<commit>): the SuperLink's and every node's processes
    then read the same files, with no further request to the Hub. Returns every problem, each naming its
    variable, the id and what to do."""
    problems: list[str] = []
    done: dict[tuple[str, str], str] = {}

    def pinned(spec: str | None, repo_type: str, setting: str) -> str | None:
        if not spec or local_path(spec) is not None:
            return spec
        if (spec, repo_type) not in done:
            try:
                done[spec, repo_type] = pin(spec, repo_type, setting)
                echo(f"{setting}={spec}: {repo_type} at commit {done[spec, repo_type].rpartition('@')[2][:12]} "
                     "in the Hugging Face cache")
            except HubError as err:
                problems.append(str(err))
                done[spec, repo_type] = spec
        return done[spec, repo_type]

    if found.settings is not None:
        found.settings = found.settings.model_copy(update={
            "base_policy": pinned(found.settings.base_policy, "model", "ZK0_BASE_POLICY"),
            "eval_dataset": pinned(found.settings.eval_dataset, "dataset", "ZK0_EVAL_DATASET"),
        })
    found.nodes = [node.model_copy(update={
        "dataset": pinned(node.dataset, "dataset", node_variable(prefix, "DATASET", found.env)),
        "base_policy": pinned(node.base_policy, "model", node_variable(prefix, "BASE_POLICY", found.env)),
    }) for node, prefix in zip(found.nodes, prefixes, strict=True)]
    return problems


def _nodes(env: dict[str, str], role: Role, index: int | None) -> tuple[list[NodeSettings], list[str], list[str]]:
    if role == "experiment" or (role == "node" and index is not None):
        return node_settings_from_env(env, index)
    if role == "server":
        return [], [], []
    try:
        return [_home_expanded(settings_from_env(NodeSettings, env))], ["ZK0_"], []
    except SettingsError as err:
        return [], [], [str(err)]


def _check(found: Experiment, prefixes: list[str], role: Role, server_problem: str = ""):
    """(rows, problems, warnings) of zk0 check for what the role runs."""
    if found.settings is not None:
        return check_experiment(found.settings, found.nodes, prefixes, found.env)
    if role == "experiment" and (eval_only := _eval_settings(found.env, server_problem)) is not None:
        return check_experiment(eval_only, found.nodes, prefixes, found.env)
    # No server settings (a node, or invalid ones): the nodes' datasets are still checked, against the
    # base policy the env-file names or zk0's default.
    base = found.env.get("ZK0_BASE_POLICY") if role == "experiment" else None
    rows, problems = check_nodes(found.nodes, base or DEFAULT_BASE, prefixes, found.env)
    problems += [p for r in rows for p in r.problems]
    warnings = [w for r in rows for w in r.warnings] + fps_warnings(rows) if role == "node" else []
    return rows, problems, warnings


def _eval_settings(env: dict[str, str], server_problem: str) -> SimpleNamespace | None:
    """What check_experiment reads of the server's settings, when those are invalid but not in the variables
    of its evaluation set: that set's row is then checked and shown all the same."""
    if not env.get("ZK0_EVAL_DATASET") or any(v in server_problem for v in EVAL_VARS):
        return None
    return SimpleNamespace(
        base_policy=absolute_spec(env.get("ZK0_BASE_POLICY") or DEFAULT_BASE),
        eval_dataset=absolute_spec(env["ZK0_EVAL_DATASET"]),
        eval_cameras=CameraMap.parse(env["ZK0_EVAL_CAMERAS"]) if env.get("ZK0_EVAL_CAMERAS") else None,
    )


def _with_lines(problem: str, env_file: Path | None, values: dict[str, str]) -> str:
    """The problem, with the env-file line of every variable it names."""
    if env_file is None:
        return problem
    lines = {}
    for number, line in enumerate(env_file.read_text().splitlines(), 1):
        if (name := line.split("=", 1)[0].strip().removeprefix("export ").strip()) in values:
            lines[name] = number
    # Not the list of known names, nor the one suggested for a misspelt name.
    named_here = re.sub(r"\(did you mean [A-Z0-9_]+\?\)", "", problem.split("; known:")[0])
    mentioned = set(re.findall(r"ZK0_[A-Z0-9_]+", named_here))
    named = [f"{env_file.name}:{lines[v]} ({v})" for v in sorted(mentioned & set(lines), key=lines.get)]
    return f"[{', '.join(named)}] {problem}" if named else problem
