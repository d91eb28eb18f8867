"""`zk0 local`: a real SuperLink and SuperNodes on loopback, one run, then a clean stop."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
from dotenv import dotenv_values

from .check import check_experiment, check_nodes, raise_problems, report, table
from .node_watch import NodeWatch
from .procs import MARK, die_with_parent, end_marked, popen_owned, start_guard
from .settings import NODE_VAR, NodeSettings, ServerSettings, SettingsError, check_env_names
from .supernode import bin_path as _bin
from .supernode import TASK_POLL, supernode_command

log = logging.getLogger("zk0")
APP_DIR = Path(__file__).resolve().parents[1]
# A SuperLink that keeps dying is not a blip to ride out: give up after this many restarts.
MAX_SUPERLINK_RESTARTS = 3
# Simulation: CPUs Flower's Ray backend reserves per ClientApp, so cpu_count // this many run at once.
SIM_CPUS_PER_NODE = 1


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env_file(env_file: Path | None) -> dict[str, str]:
    """The env-file's variables (none without a file)."""
    if env_file is None:
        return {}
    if not env_file.is_file():
        raise SettingsError(f"env-file {env_file} does not exist; pass a file such as experiments/demo.env")
    return {k: v for k, v in dotenv_values(env_file).items() if v is not None}


def load_env_file(env_file: Path | None) -> dict[str, str]:
    """The env-file's variables under the process environment (the shell outranks the file)."""
    values = read_env_file(env_file)
    check_env_names(set(values) | {k for k in os.environ if k.startswith("ZK0_")})
    return {**values, **os.environ}


def node_settings_from_env(env: dict[str, str]) -> tuple[list[NodeSettings], list[str], list[str]]:
    """(one NodeSettings per valid ZK0_NODE_<i>_* group, their variable prefixes, the invalid groups' problems)."""
    groups: dict[int, dict[str, str]] = {}
    for name, value in env.items():
        if match := NODE_VAR.match(name):
            groups.setdefault(int(match.group(1)), {})[match.group(2).lower()] = value
    if not groups:
        return [], [], ["no nodes configured: set ZK0_NODE_0_DATASET (and _1, _2, ...) in the env-file"]
    nodes, prefixes, problems = [], [], []
    for index in sorted(groups):
        fields = {"name": f"node-{index}", **groups[index]}
        try:
            nodes.append(NodeSettings.load(**fields))
            prefixes.append(f"ZK0_NODE_{index}_")
        except SettingsError as err:  # it names ZK0_<FIELD>: name the node's own variable instead
            text = str(err)
            for name in NodeSettings.model_fields:
                text = text.replace(f"ZK0_{name.upper()} (", f"ZK0_NODE_{index}_{name.upper()} (")
            problems.append(f"node {index}: {text}")
    return nodes, prefixes, problems


def _with_lines(problem: str, env_file: Path | None, lines: dict[str, int]) -> str:
    """The problem, with the env-file line of every variable it names."""
    mentioned = set(re.findall(r"ZK0_[A-Z0-9_]+", problem.split("; known:")[0]))  # not the list of known names
    named = [f"{env_file.name}:{lines[v]} ({v})" for v in sorted(mentioned & set(lines), key=lines.get)]
    return f"[{', '.join(named)}] {problem}" if named else problem


def load_experiment(env_file: Path | None, echo=print) -> tuple[dict[str, str], ServerSettings, list[NodeSettings]]:
    """The experiment an env-file describes, checked as `zk0 check` does; every problem in one refusal.

    Unknown variables, invalid values and unusable datasets are collected, each naming its variable
    and its env-file line, before one SettingsError lists them all.
    """
    values = read_env_file(env_file)
    lines = {}
    if env_file is not None:
        for number, line in enumerate(env_file.read_text().splitlines(), 1):
            if (name := line.split("=", 1)[0].strip().removeprefix("export ").strip()) in values:
                lines[name] = number
    problems: list[str] = []
    try:
        check_env_names(set(values) | {k for k in os.environ if k.startswith("ZK0_")})
    except SettingsError as err:
        problems.append(str(err))
    env = {**values, **os.environ}
    settings = None
    try:
        settings = _absolute_paths(settings_from_env(ServerSettings, env))
    except SettingsError as err:
        problems.append(str(err))
    nodes, prefixes, node_problems = node_settings_from_env(env)
    problems += node_problems
    if settings is not None:
        rows, dataset_problems, warnings = check_experiment(settings, nodes, prefixes)
    else:  # the nodes' datasets are still checked, against the base policy the env-file names
        base = env.get("ZK0_BASE_POLICY") or ServerSettings.model_fields["base_policy"].default
        rows, dataset_problems = check_nodes(nodes, base, prefixes)
        dataset_problems += [p for r in rows for p in r.problems]
        warnings = []
    echo(table(rows))
    for warning in warnings:
        echo(f"warning: {warning}")
    problems += [p for p in dataset_problems if p not in problems]
    raise_problems([_with_lines(p, env_file, lines) for p in problems], "the experiment", SettingsError)
    return env, settings, nodes


@dataclass(frozen=True)
class TlsFiles:
    """What superlink/make-certs.sh writes: a CA, the SuperLink's certificate, a key pair per node."""

    dir: Path

    @classmethod
    def check(cls, directory: Path, nodes: int) -> TlsFiles:
        """The files for `nodes` SuperNodes, or a message saying how to make them."""
        tls = cls(directory.resolve())
        wanted = [tls.ca, tls.cert, tls.key] + [p for i in range(nodes) for p in (tls.node_key(i), tls.node_pub(i))]
        if missing := [str(p) for p in wanted if not p.is_file()]:
            raise SettingsError(
                f"--tls {directory}: missing {', '.join(missing)}; make them with "
                f"`superlink/make-certs.sh -n {nodes} {directory}`"
            )
        return tls

    ca = property(lambda self: self.dir / "ca.crt")
    cert = property(lambda self: self.dir / "superlink.crt")
    key = property(lambda self: self.dir / "superlink.key")

    def node_key(self, index: int) -> Path:
        return self.dir / "supernodes" / f"node-{index}"

    def node_pub(self, index: int) -> Path:
        return self.dir / "supernodes" / f"node-{index}.pub"


@dataclass
class LocalDeployment:
    """Processes started for one local run; `stop()` ends every one of them.

    Each dies with `zk0 local` however it ends (zk0.procs): the direct children by their parent-death
    signal, everything below them by the guard that `env`'s mark belongs to.
    """

    workdir: Path
    env: dict[str, str]
    tls: TlsFiles | None = None
    simulation: int = 0  # virtual SuperNodes under Flower's simulation runtime (0: real SuperNodes)
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    superlink_starts: int = 0
    sim_nodes: list[NodeSettings] = field(default_factory=list)  # what virtual node k takes node k mod D of

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        """Start a process with its output in logs/<name>.log."""
        logfile = open(self.workdir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        proc = popen_owned(cmd, env=self.env, stdout=logfile, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def start_superlink(self) -> None:
        """SuperLink on loopback with its state in a database, so a restart keeps runs and node ids."""
        if self.tls is None:
            security = ["--insecure"]
        else:
            security = [
                "--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.cert),
                "--ssl-keyfile", str(self.tls.key), "--enable-supernode-auth",
            ]
        if self.simulation:  # the SuperLink runs the ClientApps itself, for its virtual SuperNodes
            security.append("--simulation")
        self.start("superlink", [
            _bin("flower-superlink"), *security, "--host", "127.0.0.1", "--port", str(self.port),
            # The app's dependencies are already installed here.
            "--disable-runtime-dependency-installation", "--database", str(self.workdir / "superlink.db"),
        ])
        self.superlink_starts += 1
        _wait_for_port(self.port, self.procs["superlink"], timeout=60)

    def register_nodes(self, count: int, connection: str) -> None:
        """Register each node's public key with a SuperLink that authenticates SuperNodes."""
        for index in range(count):
            res = self.flwr("supernode", "register", str(self.tls.node_pub(index)), connection)
            # The database remembers keys from an earlier start: those are fine as they are.
            if res.returncode != 0 and "already" not in (res.stdout + res.stderr).lower():
                raise RuntimeError(f"flwr supernode register node-{index} failed: {res.stdout}{res.stderr}")

    def start_supernode(self, index: int, node: NodeSettings) -> None:
        """One SuperNode, its dataset and name passed through --node-config."""
        self.start(f"supernode-{index}", supernode_command(
            f"127.0.0.1:{self.port}", node, port=free_port(),
            root_certificates=self.tls and self.tls.ca, auth_key=self.tls and self.tls.node_key(index),
        ))

    def flwr(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """Run a `flwr` CLI command against this deployment."""
        return subprocess.run([_bin("flwr"), *args], env=self.env, text=True, capture_output=True,
                              preexec_fn=die_with_parent(), **kwargs)

    def stop(self) -> None:
        """SIGTERM every process group (nodes deregister at once), SIGKILL what lingers, then end what
        their processes started in sessions of their own (SuperExecs, ServerApp, warm workers)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        end_marked(self.env.get(MARK))


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


def _resolved(settings, names: tuple[str, ...], updates: dict):
    """The settings with each of `names` that is a local path made absolute (Hub ids stay as they are)."""
    for name in names:
        value = getattr(settings, name)
        if value and Path(value).exists():
            updates[name] = str(Path(value).resolve())
    return settings.model_copy(update=updates)


def _absolute_paths(settings: ServerSettings) -> ServerSettings:
    # The ServerApp runs in another working directory: hand it absolute paths.
    return _resolved(settings, ("base_policy", "eval_dataset"), {"output_dir": settings.output_dir.resolve()})


def _absolute_node_paths(node: NodeSettings) -> NodeSettings:
    return _resolved(node, ("dataset", "base_policy"), {"cache_dir": node.cache_dir.resolve()} if node.cache_dir else {})


def preflight(settings: ServerSettings, nodes: list[NodeSettings], echo=print) -> None:
    """`zk0 check`: every dataset against the base policy, the table printed; every problem raised at once."""
    rows, problems, warnings = check_experiment(settings, nodes)
    report(rows, problems, warnings, "the experiment", echo=echo)


def run_status(dep: LocalDeployment, run_id: str, connection: str) -> str:
    """The run's status from `flwr ls` ('' while the SuperLink does not answer)."""
    res = dep.flwr("ls", connection, "--run-id", run_id, "--format", "json")
    if res.returncode != 0:
        return ""
    runs = json.loads(res.stdout).get("runs", [])
    return runs[0].get("status", "") if runs else ""


class LogStream:
    """`flwr log --stream` of the current run, restarted when the run or the SuperLink changes."""

    def __init__(self, dep: LocalDeployment, connection: str):
        self.dep, self.connection, self.proc = dep, connection, None

    def follow(self, run_id: str) -> None:
        self.close(grace=0)
        self.proc = subprocess.Popen([_bin("flwr"), "log", run_id, self.connection, "--stream"], env=self.dep.env,
                                     preexec_fn=die_with_parent())

    def close(self, grace: float = 1.0) -> None:
        if self.proc is not None:
            time.sleep(grace)  # let the last lines of the stream arrive
            self.proc.terminate()
            self.proc.wait(timeout=10)


def run_to_end(dep: LocalDeployment, settings: ServerSettings, connection: str, stream: LogStream, poll: float = 2.0):
    """Submit the run and see it to a final status through SuperLink restarts; return (run id, status).

    Flower 1.42 fails the running run when its SuperLink dies (the ServerApp dies with it); the
    SuperNodes reconnect by themselves. So a dead SuperLink is started again on the same port and
    database, and a run that failed across that restart is submitted again: its ServerApp resumes
    from the newest checkpoint.
    """
    run_id = submit(dep, settings, connection)
    log.info("run %s submitted", run_id)
    stream.follow(run_id)
    restarted = False
    while True:
        superlink = dep.procs["superlink"]
        if superlink.poll() is not None:
            if dep.superlink_starts > MAX_SUPERLINK_RESTARTS:
                return run_id, f"finished:superlink-exited-{superlink.returncode}"
            log.warning("SuperLink exited with code %s; starting it again on port %d with its database", superlink.returncode, dep.port)
            dep.start_superlink()
            restarted = True
            continue
        status = run_status(dep, run_id, connection)
        if status == "finished:failed" and restarted:
            log.warning("run %s failed with the SuperLink restart; submitting it again to resume from the newest checkpoint", run_id)
            run_id, restarted = submit(dep, settings, connection), False
            log.info("run %s submitted", run_id)
            stream.follow(run_id)
        elif status.startswith("finished"):
            return run_id, status
        time.sleep(poll)


def submit(dep: LocalDeployment, settings: ServerSettings, connection: str) -> str:
    """`flwr run` the app with the settings as run config; return the run id."""
    run_config = dep.workdir / "run-config.toml"
    config = settings.to_flower_config()
    federation = []
    if dep.simulation:
        config["sim-nodes"] = json.dumps([node.to_flower_config() for node in dep.sim_nodes])
        federation = ["--federation-config", f"num-supernodes={dep.simulation} client-resources-num-cpus={SIM_CPUS_PER_NODE}"]
    run_config.write_text(tomli_w.dumps(config))
    res = dep.flwr("run", str(APP_DIR), connection, "--run-config", str(run_config), *federation, "--format", "json")
    try:
        return str(json.loads(res.stdout)["run-id"])
    except (ValueError, KeyError):
        raise RuntimeError(f"flwr run failed (exit {res.returncode}): {res.stdout}\n{res.stderr}") from None


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None = None) -> None:
    """Flower 1.42 keeps SuperLink connections in $FLWR_HOME/config.toml."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = {"insecure": True} if root_certificates is None else {"root-certificates": str(root_certificates)}
    config = {"superlink": {"default": name, name: {"address": address, **security}}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))


def _stop_on_sigterm() -> None:
    """SIGTERM (`kill`, a service manager) stops the run as Ctrl-C does: through run_local's `finally`,
    so nodes deregister and every process ends in order instead of by its parent-death signal."""

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the stop short
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def check_simulation(simulation: int, settings: ServerSettings, tls_dir: Path | None) -> None:
    """`--simulation N` problems, all at once, before anything starts."""
    problems = []
    if simulation < 1:
        problems.append(f"--simulation {simulation}: give the number of virtual SuperNodes (1 or more)")
    elif settings.min_nodes > simulation:
        problems.append(f"ZK0_MIN_NODES={settings.min_nodes} exceeds --simulation {simulation}: no round could aggregate; "
                        f"set ZK0_MIN_NODES to at most {simulation}")
    if tls_dir is not None:
        problems.append("--tls with --simulation: virtual SuperNodes live inside the SuperLink, nothing crosses a network; drop --tls")
    if importlib.util.find_spec("ray") is None:  # e.g. the zk0 image, which serves real SuperNodes only
        problems.append("--simulation needs Flower's simulation runtime (Ray), which is not installed here: "
                        "pip install 'flwr[simulation]==1.42.0' (scripts/setup.sh installs it)")
    raise_problems(problems, "the simulation", SettingsError)


def run_local(env_file: Path | None, tls_dir: Path | None = None, simulation: int | None = None) -> int:
    """Run one experiment on loopback; 0 only when the run completed.

    With `simulation` = N, Flower's simulation runtime runs N virtual SuperNodes inside the SuperLink
    (Ray actors, SIM_CPUS_PER_NODE CPUs each) with the same ServerApp and ClientApp; virtual node k
    trains on the env-file's node k mod D.
    """
    env, settings, nodes = load_experiment(env_file)
    if simulation is not None:
        check_simulation(simulation, settings, tls_dir)
    # Nodes that share this host's cores must not each start a full thread pool: oversubscribed
    # OpenMP threads spin against each other and make training many times slower.
    at_once = max(1, (os.cpu_count() or 1) // SIM_CPUS_PER_NODE) if simulation else len(nodes)
    threads = max(1, (os.cpu_count() or 1) // at_once)
    nodes = [n if n.torch_threads else n.model_copy(update={"torch_threads": threads}) for n in nodes]
    tls = TlsFiles.check(tls_dir, len(nodes)) if tls_dir is not None else None
    if tls is None and not simulation:
        log.warning("no --tls: SuperLink and SuperNodes talk without TLS or node authentication; "
                    "fine on one workstation, use --tls DIR (superlink/make-certs.sh) for anything else")
    workdir = settings.output_dir / "local"
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    flwr_home = workdir / "flwr-home"
    # Flower spawns flower-superexec by name: the interpreter's bin directory must be on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc_env = {**TASK_POLL, **env, "PATH": path, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
                "PYTHONUNBUFFERED": "1"}
    proc_env = start_guard(proc_env)  # every process below inherits the guard's mark
    _stop_on_sigterm()
    # Virtual nodes run in the simulation runtime's working directory: hand them absolute paths.
    sim_nodes = [_absolute_node_paths(n) for n in nodes] if simulation else []
    dep = LocalDeployment(workdir, proc_env, tls, simulation=simulation or 0, sim_nodes=sim_nodes)
    write_connection(flwr_home, "local", f"127.0.0.1:{dep.port}", tls and tls.ca)
    stream = LogStream(dep, "local")
    # A node whose ClientApp keeps failing to start is reported, then given up on (zk0.node_watch).
    watch = NodeWatch(workdir, [] if simulation else [node.display_name for node in nodes])
    started = time.monotonic()
    try:
        dep.start_superlink()
        if tls is not None:
            dep.register_nodes(len(nodes), "local")
        if simulation:
            log.info("SuperLink on 127.0.0.1:%d with %d virtual SuperNodes (Flower's simulation runtime, %d at a time); "
                     "logs in %s", dep.port, simulation, at_once, workdir / "logs")
        else:
            for index, node in enumerate(nodes):
                dep.start_supernode(index, node)
            watch.start([dep.procs[f"supernode-{index}"] for index in range(len(nodes))])
            log.info("SuperLink on 127.0.0.1:%d, %d SuperNodes; logs in %s", dep.port, len(nodes), workdir / "logs")
        run_id, status = run_to_end(dep, settings, "local", stream)
    finally:
        watch.stop()
        stream.close()
        dep.stop()
    log.info("run %s: %s after %.1fs; outputs in %s", run_id, status, time.monotonic() - started, settings.output_dir)
    return 0 if status == "finished:completed" else 1
