"""`zk0 local`: a real SuperLink and SuperNodes on loopback, one run, then a clean stop."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
from dotenv import dotenv_values

from .data import open_metadata
from .settings import NODE_VAR, NodeSettings, ServerSettings, SettingsError, check_env_names

log = logging.getLogger("zk0")
APP_DIR = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_env_file(env_file: Path | None) -> dict[str, str]:
    """The env-file's variables under the process environment (the shell outranks the file)."""
    values: dict[str, str] = {}
    if env_file is not None:
        if not env_file.is_file():
            raise SettingsError(f"env-file {env_file} does not exist; pass a file such as experiments/demo.env")
        values = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
    check_env_names(set(values) | {k for k in os.environ if k.startswith("ZK0_")})
    return {**values, **os.environ}


def node_settings_from_env(env: dict[str, str]) -> list[NodeSettings]:
    """One NodeSettings per ZK0_NODE_<i>_* group, validated before anything starts."""
    groups: dict[int, dict[str, str]] = {}
    for name, value in env.items():
        if match := NODE_VAR.match(name):
            groups.setdefault(int(match.group(1)), {})[match.group(2).lower()] = value
    if not groups:
        raise SettingsError("no nodes configured: set ZK0_NODE_0_DATASET (and _1, _2, ...) in the env-file")
    nodes = []
    for index in sorted(groups):
        fields = {"name": f"node-{index}", **groups[index]}
        try:
            nodes.append(NodeSettings(**fields))
        except Exception as err:  # pydantic's message names the field; add the variable prefix
            raise SettingsError(f"ZK0_NODE_{index}_*: {err}") from None
    return nodes


@dataclass
class LocalDeployment:
    """Processes started for one local run; `stop()` ends every one of them."""

    workdir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        """Start a process with its output in logs/<name>.log."""
        logfile = open(self.workdir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        proc = subprocess.Popen(cmd, env=self.env, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_superlink(self) -> None:
        """SuperLink on loopback; the app's dependencies are already installed here."""
        self.start("superlink", [
            _bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation",
        ])
        _wait_for_port(self.port, self.procs["superlink"], timeout=60)

    def start_supernode(self, index: int, node: NodeSettings) -> None:
        """One SuperNode, its dataset and name passed through --node-config."""
        node_config = " ".join(f"{k}={_toml_value(v)}" for k, v in node.to_flower_config().items())
        self.start(f"supernode-{index}", [
            _bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
            "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", node_config,
        ])

    def flwr(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """Run a `flwr` CLI command against this deployment."""
        return subprocess.run([_bin("flwr"), *args], env=self.env, text=True, capture_output=True, **kwargs)

    def stop(self) -> None:
        """SIGTERM every process group (nodes deregister at once), SIGKILL what lingers."""
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _bin(name: str) -> str:
    # The console scripts live next to this interpreter, whatever PATH says.
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _toml_value(value) -> str:
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SuperLink exited with code {proc.returncode} before listening on port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"SuperLink did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def settings_from_env(cls, env: dict[str, str]):
    """Build a settings class from a variables mapping rather than this process's environment."""
    prefix = "ZK0_"
    return cls.load(**{f: env[f"{prefix}{f.upper()}"] for f in cls.model_fields if f"{prefix}{f.upper()}" in env})


def _absolute_paths(settings: ServerSettings) -> ServerSettings:
    # The ServerApp runs in another working directory: hand it absolute paths.
    updates = {"output_dir": settings.output_dir.resolve()}
    for name in ("base_policy", "eval_dataset"):
        value = getattr(settings, name)
        if value and Path(value).exists():
            updates[name] = str(Path(value).resolve())
    return settings.model_copy(update=updates)


def preflight(settings: ServerSettings, nodes: list[NodeSettings]) -> None:
    """Check local datasets and the base policy before any process starts."""
    for spec in [n.dataset for n in nodes] + [settings.eval_dataset]:
        if spec and spec.startswith(("/", ".", "~")) or (spec and Path(spec).exists()):
            open_metadata(spec)
    base = settings.base_policy
    if base.startswith(("/", ".", "~")) and not (Path(base) / "config.json").is_file():
        raise SettingsError(
            f"ZK0_BASE_POLICY={base}: no saved policy there (missing config.json); "
            "run `zk0 demo` for the offline demo or use a Hub id such as lerobot/smolvla_base"
        )


def wait_for_run(dep: LocalDeployment, run_id: str, connection: str, poll: float = 2.0) -> str:
    """Poll `flwr ls` until the run reaches a finished:* status; return it."""
    while True:
        res = dep.flwr("ls", connection, "--run-id", run_id, "--format", "json")
        if res.returncode == 0:
            runs = json.loads(res.stdout).get("runs", [])
            status = runs[0].get("status", "") if runs else ""
            if status.startswith("finished"):
                return status
        for name, proc in dep.procs.items():
            if name == "superlink" and proc.poll() is not None:
                return f"finished:superlink-exited-{proc.returncode}"
        time.sleep(poll)


def submit(dep: LocalDeployment, settings: ServerSettings, connection: str) -> str:
    """`flwr run` the app with the settings as run config; return the run id."""
    run_config = dep.workdir / "run-config.toml"
    run_config.write_text(tomli_w.dumps(settings.to_flower_config()))
    res = dep.flwr("run", str(APP_DIR), connection, "--run-config", str(run_config), "--format", "json")
    try:
        return str(json.loads(res.stdout)["run-id"])
    except (ValueError, KeyError):
        raise RuntimeError(f"flwr run failed (exit {res.returncode}): {res.stdout}\n{res.stderr}") from None


def write_connection(flwr_home: Path, name: str, address: str) -> None:
    """Flower 1.42 keeps SuperLink connections in $FLWR_HOME/config.toml."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    config = {"superlink": {"default": name, name: {"address": address, "insecure": True}}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))


def run_local(env_file: Path | None) -> int:
    """Run one experiment on loopback; 0 only when the run completed."""
    env = load_env_file(env_file)
    settings = _absolute_paths(settings_from_env(ServerSettings, env))
    nodes = node_settings_from_env(env)
    # Nodes that share this host's cores must not each start a full thread pool: oversubscribed
    # OpenMP threads spin against each other and make training many times slower.
    threads = max(1, (os.cpu_count() or 1) // len(nodes))
    nodes = [n if n.torch_threads else n.model_copy(update={"torch_threads": threads}) for n in nodes]
    preflight(settings, nodes)
    workdir = settings.output_dir / "local"
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    flwr_home = workdir / "flwr-home"
    # Flower spawns flower-superexec by name: the interpreter's bin directory must be on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc_env = {**env, "PATH": path, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    dep = LocalDeployment(workdir, proc_env)
    write_connection(flwr_home, "local", f"127.0.0.1:{dep.port}")
    streamer = None
    started = time.monotonic()
    try:
        dep.start_superlink()
        for index, node in enumerate(nodes):
            dep.start_supernode(index, node)
        log.info("SuperLink on 127.0.0.1:%d, %d SuperNodes; logs in %s", dep.port, len(nodes), workdir / "logs")
        run_id = submit(dep, settings, "local")
        log.info("run %s submitted", run_id)
        streamer = subprocess.Popen([_bin("flwr"), "log", run_id, "local", "--stream"], env=proc_env)
        status = wait_for_run(dep, run_id, "local")
    finally:
        if streamer is not None:
            time.sleep(1)  # let the last lines of the stream arrive
            streamer.terminate()
            streamer.wait(timeout=10)
        dep.stop()
    log.info("run %s: %s after %.1fs; outputs in %s", run_id, status, time.monotonic() - started, settings.output_dir)
    return 0 if status == "finished:completed" else 1
