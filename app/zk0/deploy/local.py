"""`zk0 local`: a real SuperLink and SuperNodes on loopback, one run, then a clean stop."""

from __future__ import annotations

import importlib.util
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

from ..check import raise_problems
from ..settings import NodeSettings, ServerSettings, SettingsError
from .flwr_cli import LOST, MAX_RETRIES, QUIET, Flwr, bin_path, see_run_through, write_connection
from .node_watch import NodeWatch
from .preflight import absolute_node_paths, preflight
from .procs import MARK, end_children, end_marked, popen_owned, start_guard
from .run_lock import lock_run, release_run
from .supernode import TASK_POLL, supernode_command

log = logging.getLogger("zk0")
APP_DIR = Path(__file__).resolve().parents[2]  # app/: the Flower App folder holding pyproject.toml
# Simulation: CPUs Flower's Ray backend reserves per ClientApp, so cpu_count // this many run at once.
SIM_CPUS_PER_NODE = 1


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    Each dies with `zk0 local` however it ends (zk0.deploy.procs): the direct children by their parent-death
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
    fast_loop: bool = True  # SuperNodes in zk0's fast loop (zk0.deploy.node_loop), else Flower's own

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
            bin_path("flower-superlink"), *security, "--host", "127.0.0.1", "--port", str(self.port),
            # The app's dependencies are already installed here.
            "--disable-runtime-dependency-installation", "--database", str(self.workdir / "superlink.db"),
        ])
        self.superlink_starts += 1
        _wait_for_port(self.port, self.procs["superlink"], timeout=60)

    def register_nodes(self, count: int) -> None:
        """Register each node's public key with a SuperLink that authenticates SuperNodes."""
        for index in range(count):
            res = self.cli("supernode", "register", str(self.tls.node_pub(index)), self.cli.connection)
            # The database remembers keys from an earlier start: those are fine as they are.
            if res.returncode != 0 and "already" not in (res.stdout + res.stderr).lower():
                raise RuntimeError(f"flwr supernode register node-{index} failed: {res.stdout}{res.stderr}")

    def start_supernode(self, index: int, node: NodeSettings) -> None:
        """One SuperNode, its dataset and name passed through --node-config."""
        self.start(f"supernode-{index}", supernode_command(
            f"127.0.0.1:{self.port}", node, port=free_port(),
            root_certificates=self.tls and self.tls.ca, auth_key=self.tls and self.tls.node_key(index),
            fast_loop=self.fast_loop,
        ))

    @property
    def cli(self) -> Flwr:
        """The `flwr` CLI against this deployment's SuperLink (connection `local`)."""
        return Flwr(self.env, "local")

    def stop(self) -> None:
        """SIGTERM every process group (nodes deregister at once), SIGKILL what lingers, then end what
        their processes started in sessions of their own (SuperExecs, ServerApp, warm workers)."""
        superlink = self.procs.get("superlink")
        if superlink is not None and superlink.poll() is None:
            # The SuperLink gives its SuperExec 1 s to exit and warns when it takes longer, as it does (its
            # exit handlers stop a gRPC server with a 1 s grace): the SuperExec is stopped first.
            end_children(superlink.pid, timeout=10)
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


def submit_run(dep: LocalDeployment, settings: ServerSettings) -> str:
    """`flwr run` the app with the settings as run config; the run id."""
    run_config = dep.workdir / "run-config.toml"
    config = settings.to_flower_config()
    federation = []
    if dep.simulation:
        config["sim-nodes"] = json.dumps([node.to_flower_config() for node in dep.sim_nodes])
        federation = ["--federation-config",
                      f"num-supernodes={dep.simulation} client-resources-num-cpus={SIM_CPUS_PER_NODE}"]
    run_config.write_text(tomli_w.dumps(config))
    run_id = dep.cli.submit(APP_DIR, run_config, *federation)
    log.info("run %s submitted", run_id)
    return run_id


def keep_superlink(dep: LocalDeployment) -> str | None:
    """Start a dead SuperLink again on the same port and database (it keeps runs and node ids): LOST;
    a final status once it died more than MAX_RETRIES times; None while it runs."""
    superlink = dep.procs["superlink"]
    if superlink.poll() is None:
        return None
    if dep.superlink_starts > MAX_RETRIES:
        return f"finished:superlink-exited-{superlink.returncode}"
    log.warning("SuperLink exited with code %s; starting it again on port %d with its database",
                superlink.returncode, dep.port)
    dep.start_superlink()
    return LOST


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
        problems.append(f"ZK0_MIN_NODES={settings.min_nodes} exceeds --simulation {simulation}: no round could "
                        f"aggregate; set ZK0_MIN_NODES to at most {simulation}")
    if tls_dir is not None:
        problems.append("--tls with --simulation: virtual SuperNodes live inside the SuperLink, nothing crosses a "
                        "network; drop --tls")
    if importlib.util.find_spec("ray") is None:  # e.g. the zk0 image, which serves real SuperNodes only
        problems.append("--simulation needs Flower's simulation runtime (Ray), which is not installed here: "
                        "pip install 'flwr[simulation]==1.42.0' (scripts/setup.sh installs it)")
    raise_problems(problems, "the simulation", SettingsError)


def run_local(env_file: Path | None, tls_dir: Path | None = None, simulation: int | None = None,
              fast_loop: bool = True) -> int:
    """Run one experiment on loopback; 0 only when the run completed.

    With `simulation` = N, Flower's simulation runtime runs N virtual SuperNodes inside the SuperLink
    (Ray actors, SIM_CPUS_PER_NODE CPUs each) with the same ServerApp and ClientApp; virtual node k
    trains on the env-file's node k mod D. `fast_loop` runs the SuperNodes in zk0's fast loop
    (zk0.deploy.node_loop), else Flower's own flower-supernode.
    """
    experiment = preflight(env_file, download=True)
    settings, nodes = experiment.settings, experiment.nodes
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
    # One run per output folder, refused before anything starts (zk0.deploy.run_lock).
    lock = lock_run(settings.output_dir)
    workdir = settings.output_dir / "local"
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    _stop_on_sigterm()
    # Virtual nodes run in the simulation runtime's working directory: hand them absolute paths.
    sim_nodes = [absolute_node_paths(n) for n in nodes] if simulation else []
    dep = LocalDeployment(workdir, _process_env(experiment.env, workdir / "flwr-home", fast_loop), tls,
                          simulation=simulation or 0, sim_nodes=sim_nodes, fast_loop=fast_loop)
    write_connection(workdir / "flwr-home", f"127.0.0.1:{dep.port}", tls and tls.ca, name="local")
    # A node whose ClientApp keeps failing to start is reported, then given up on (zk0.deploy.node_watch).
    watch = NodeWatch(workdir, [] if simulation else [node.display_name for node in nodes])
    started = time.monotonic()
    try:
        _start(dep, nodes, watch, at_once)
        run_id, status = see_run_through(dep.cli, lambda: submit_run(dep, settings), 2.0, lambda: keep_superlink(dep))
    finally:
        watch.stop()
        dep.stop()
        release_run(lock)
    log.info("run %s: %s after %.1fs; outputs in %s", run_id, status, time.monotonic() - started, settings.output_dir)
    return 0 if status == "finished:completed" else 1


def _process_env(env: dict[str, str], flwr_home: Path, fast_loop: bool = True) -> dict[str, str]:
    """The environment of every process `zk0 local` starts, carrying the guard's mark (zk0.deploy.procs)."""
    # Flower spawns flower-superexec by name: the interpreter's bin directory must be on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return start_guard({**(TASK_POLL if fast_loop else {}), **env, "PATH": path, "FLWR_HOME": str(flwr_home), **QUIET,
                        "PYTHONUNBUFFERED": "1"})


def _start(dep: LocalDeployment, nodes: list[NodeSettings], watch: NodeWatch, at_once: int) -> None:
    """The SuperLink, then (with --tls) the nodes' keys, then the SuperNodes unless they are virtual."""
    dep.start_superlink()
    if dep.tls is not None:
        dep.register_nodes(len(nodes))
    logs = dep.workdir / "logs"
    if dep.simulation:
        log.info("SuperLink on 127.0.0.1:%d with %d virtual SuperNodes (Flower's simulation runtime, %d at a time); "
                 "logs in %s", dep.port, dep.simulation, at_once, logs)
        return
    for index, node in enumerate(nodes):
        dep.start_supernode(index, node)
    watch.start([dep.procs[f"supernode-{index}"] for index in range(len(nodes))])
    log.info("SuperLink on 127.0.0.1:%d, %d SuperNodes (%s); logs in %s", dep.port, len(nodes),
             "zk0 fast loop; --no-fast-loop for Flower's own" if dep.fast_loop else "Flower's own loop", logs)
