"""The Docker Compose deployment, driven through a real Docker engine.

Needs a Docker engine and Compose v2 (`scripts/docker-setup.sh` installs and starts them as root).
Without them these tests are skipped with the reason; with REQUIRE_DOCKER=1 (as in `.ci/run`)
they fail instead, so CI can never pass them silently.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest
from compose_stack import (
    CPU,
    DEMO_ENV,
    IMAGE,
    ROOT,
    Stack,
    clean_env,
    compose,
    config,
    dump_logs,
    normal_priority,
    outputs,
    robot_dataset,
    tls_files,
)

from zk0.settings import ServerSettings


def _unavailable(reason: str):
    if os.environ.get("REQUIRE_DOCKER") == "1":
        pytest.fail(f"REQUIRE_DOCKER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def compose_cli():
    if shutil.which("docker") is None:
        _unavailable("no docker CLI on PATH (run scripts/docker-setup.sh as root)")
    res = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, preexec_fn=normal_priority)
    if res.returncode != 0:
        _unavailable(f"no Docker Compose v2 plugin: {res.stderr.strip()}")


def test_gpu_variant_pins_four_distinct_gpus(compose_cli):
    cfg = config(*DEMO_ENV)
    ids = []
    for i in range(4):
        devices = cfg["services"][f"supernode-{i}"]["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["capabilities"] == ["gpu"]
        ids += devices[0]["device_ids"]
    assert ids == ["0", "1", "2", "3"]
    # Each node's GPU comes from its own variable.
    cfg = config(*DEMO_ENV, env=clean_env(ZK0_NODE_2_GPU="7"))
    assert cfg["services"]["supernode-2"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["7"]


def test_cpu_variant_reserves_no_gpu(compose_cli):
    cfg = config(*DEMO_ENV, *CPU)
    for i in range(4):
        node = cfg["services"][f"supernode-{i}"]
        assert not node.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        assert node["environment"]["ZK0_DEVICE"] == "cpu"
        # Each node reads its own ZK0_NODE_<i>_* (`zk0 supernode --index i`) from the variables all four get.
        assert node["command"][node["command"].index("--index") + 1] == str(i)
        assert node["environment"][f"ZK0_NODE_{i}_DATASET"] == f"demo-data/datasets/node-{i}"


def test_tls_overlay_secures_every_connection(compose_cli):
    cfg = config(*DEMO_ENV, *CPU, "-f", "compose.tls.yaml")["services"]
    link = cfg["superlink"]["command"]
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    tls_args = {"--ssl-ca-certfile=/tls/ca.crt", "--ssl-certfile=/tls/superlink.crt",
                "--ssl-keyfile=/tls/superlink.key"}
    assert tls_args <= set(link)
    keys = set()
    for i in range(4):
        cmd = cfg[f"supernode-{i}"]["command"]
        assert "--insecure" not in cmd and cmd[cmd.index("--root-certificates") + 1] == "/tls/ca.crt"
        keys.add(cmd[cmd.index("--auth-key") + 1])
        assert cfg[f"supernode-{i}"]["depends_on"]["register"]["condition"] == "service_completed_successfully"
    assert len(keys) == 4  # one key pair per node
    serverapp = cfg["serverapp"]["command"]
    assert "--insecure" not in serverapp and "--root-certificates=/tls/ca.crt" in serverapp
    assert "--root-certificates" in cfg["submit"]["command"]
    assert "register-keys.sh" in " ".join(cfg["register"]["entrypoint"])


def test_every_variable_has_a_default_or_a_message():
    for name in ("compose.yaml", "compose.cpu.yaml", "compose.tls.yaml"):
        text = (ROOT / name).read_text()
        refs = re.findall(r"\$\{([^}]*)\}", text)
        assert refs or name == "compose.cpu.yaml", name  # the CPU overlay sets plain values only
        bare = [r for r in refs if not re.match(r"^\w+(:-|:\?).+|^\w+:-$", r)]
        assert not bare, f"{name}: ${{VAR}} without a default or a :? message: {bare}"
        for ref in refs:
            if ":?" in ref:
                assert len(ref.split(":?", 1)[1]) > 20, f"{name}: terse :? message in {ref}"


def test_missing_dataset_variable_is_named(compose_cli):
    res = compose("--env-file", "/dev/null", "config", env=clean_env(), check=False)  # nothing set
    assert res.returncode != 0
    assert re.search(r"ZK0_NODE_\d_DATASET", res.stderr) and "LeRobot dataset" in res.stderr, res.stderr


def test_submit_service_carries_every_server_setting(compose_cli):
    env = config(*DEMO_ENV, *CPU)["services"]["submit"]["environment"]
    assert ServerSettings.env_names() <= set(env)
    assert env["ZK0_PROXIMAL_MU"] == "0.01" and env["ZK0_OUTPUT_DIR"] == "outputs/demo"
    serverapp = config(*DEMO_ENV, *CPU, env=clean_env(WANDB_RUN_ID="abc123", HF_TOKEN="hf_x"))["services"]["serverapp"]
    assert serverapp["environment"]["WANDB_RUN_ID"] == "abc123" and serverapp["environment"]["HF_TOKEN"] == "hf_x"


def test_every_service_that_reads_the_hub_gets_its_address_token_offline_mode_and_cache(compose_cli):
    # Hub ids in Compose: the nodes (zk0 supernode downloads their datasets), the ServerApp (base policy,
    # evaluation set) and submit (its check reads their metadata) share one Hub cache volume.
    hub = {"HF_ENDPOINT": "http://hub.example.org:8080", "HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "1"}
    services = config(*DEMO_ENV, *CPU, env=clean_env(**hub))["services"]
    for name in ("supernode-0", "supernode-3", "serverapp", "submit"):
        env, volumes = services[name]["environment"], services[name]["volumes"]
        assert {k: env.get(k) for k in hub} == hub, name
        assert {"source": "hf-cache", "target": "/home/zk0/.cache/huggingface"}.items() <= next(
            v for v in volumes if v.get("source") == "hf-cache").items(), name
    default = config(*DEMO_ENV, *CPU, env=clean_env())["services"]["supernode-0"]["environment"]
    assert default["HF_ENDPOINT"] == "https://huggingface.co"


def test_env_example_documents_every_variable():
    example = (ROOT / ".env.example").read_text()
    used = set()
    for name in ("compose.yaml", "compose.cpu.yaml", "compose.tls.yaml"):
        used |= set(re.findall(r"\$\{(\w+)", (ROOT / name).read_text()))
    documented = set(re.findall(r"^#?\s*(\w+)=", example, re.M))
    missing = {v for v in used if re.sub(r"_\d+_", "_0_", v) not in documented}
    assert not missing, f".env.example does not list {sorted(missing)}"
    for name in ("ZK0_PROXIMAL_MU", "WANDB_RUN_ID", "WANDB_MODE", "WANDB_API_KEY", "ZK0_HF_REPO_ID", "HF_TOKEN"):
        assert name in documented


# --- a real Docker engine from here on -------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(compose_cli):
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as err:  # noqa: BLE001 - no daemon socket, permission denied, ...: reported as the reason
        _unavailable(f"no Docker engine reachable: {err}")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        _unavailable(f"image {IMAGE} is not built: run scripts/docker-setup.sh (or `docker compose build`)")
    s = Stack(f"zk0test{os.getpid()}")
    s.client = client
    yield s
    for c in client.containers.list(all=True, filters={"label": f"zk0test={s.project}"}):
        c.remove(force=True)
    s("down", "-v", "--remove-orphans", "--timeout", "5", check=False, timeout=300)


def test_compose_demo_runs_two_rounds_on_cpu_with_tls_and_node_auth(stack, tmp_path):
    """The CPU demo behind compose.tls.yaml: node keys registered, two rounds, a stranger's key refused.
    The stack without TLS runs whole in the tests below."""
    tls = stack.overlay("compose.tls.yaml")
    env = stack.env(ZK0_NUM_ROUNDS="2", ZK0_LOCAL_STEPS="5", ZK0_OUTPUT_DIR="outputs/two-rounds",
                    ZK0_ROUND_TIMEOUT="900",
                    ZK0_TLS_DIR=str(tls_files(tmp_path / "certs")))
    code, wall = tls.run(env)
    print(f"docker compose up -> two-round demo with TLS finished: {wall:.0f}s")
    assert code == 0, dump_logs(tls, ("register", "submit", "serverapp", "supernode-0", "superlink"))
    assert "finished:completed" in tls.logs("submit")
    registered = re.findall(r"registered /tls/supernodes/(node-\d)\.pub", tls.logs("register"))
    assert sorted(registered) == [f"node-{i}" for i in range(4)]
    # A SuperNode whose key was never registered reaches the TLS SuperLink and is refused by node auth.
    stranger = tls("run", "--rm", "--no-deps", "-T", "supernode-3", "zk0", "supernode", "--index", "3",
                   "--superlink", "superlink:8000",
                   "--root-certificates", "/tls/ca.crt", "--auth-key", "/tls/supernodes/node-4",
                   "--connect-tries", "10",
                   env=env, timeout=300, check=False)
    refused = "Failed to activate SuperNode" in stranger.stdout + stranger.stderr
    assert stranger.returncode != 0 and refused, stranger.stderr[-3000:]
    got = outputs(stack, "two-rounds", 2)
    assert got["rounds"] == [0, 1, 2]
    assert {"history.json", "round-000.json", "round-001.json", "round-002.json"} <= set(got["files"])
    assert got["checkpoints"] == ["round-001", "round-002"]
    assert got["parameters"] > 0
    for r in (1, 2):
        assert got["contributors"][str(r)] == [f"node-{i}" for i in range(4)]
    assert set(got["server_loss"]) == {"0", "1", "2"}


def test_a_remote_host_joins_with_docker_run(stack):
    """A fifth SuperNode started with plain `docker run` of the same image, as on a robot's host."""
    env = stack.env(ZK0_NUM_ROUNDS="1", ZK0_LOCAL_STEPS="3", ZK0_MIN_NODES="5", ZK0_OUTPUT_DIR="outputs/remote-host",
                    ZK0_ROUND_TIMEOUT="900")
    stack("up", "-d", "superlink", env=env, timeout=900)
    stack("up", "demo", env=env, timeout=900)  # attached: returns once the one-shot demo service exited
    data = robot_dataset(stack)
    try:
        # supernodes/join.sh: one plain `docker run` of the image. Host networking and the SuperLink's
        # published port: the robot host reaches the workstation by address.
        join = subprocess.run(
            [str(ROOT / "supernodes" / "join.sh"), "--superlink", f"127.0.0.1:{stack.port}", "--dataset", str(data),
             "--cameras", "laptop=camera1,phone=camera2",
             "--name", "robot-host", "--image", IMAGE, "--container", f"{stack.project}-robot", "--",
             "--network", "host", "--label", f"zk0test={stack.project}", "-e", "ZK0_TORCH_THREADS=1",
             # the base policy, as a robot host has it (from the Hub in real life)
             "-v", f"{stack.project}_demo-data:/work/demo-data:ro"],
            env=clean_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=120, preexec_fn=normal_priority,
        )
        assert join.returncode == 0, join.stderr
        robot = stack.client.containers.get(f"{stack.project}-robot")
        code, _ = stack.run(env)
        assert code == 0, dump_logs(stack) + "\n--- robot ---\n" + robot.logs().decode()[-3000:]
        got = outputs(stack, "remote-host", 1)
        assert got["contributors"]["1"] == sorted(["robot-host"] + [f"node-{i}" for i in range(4)])
        robot.stop(timeout=30)  # SIGTERM: the node deregisters at once and is not sampled again
    finally:
        shutil.rmtree(data, ignore_errors=True)


def test_killed_supernode_container_rejoins(stack):
    """`docker kill` one SuperNode mid-round, `docker compose up -d` it again: nothing is lost."""
    env = stack.env(ZK0_NUM_ROUNDS="3", ZK0_LOCAL_STEPS="20", ZK0_MIN_NODES="3", ZK0_OUTPUT_DIR="outputs/kill-node",
                    ZK0_ROUND_TIMEOUT="900")
    for c in stack.client.containers.list(all=True, filters={"label": f"zk0test={stack.project}"}):
        c.stop(timeout=30)  # only the four compose nodes in this scenario
        c.remove(force=True)
    since = int(time.time())
    stack("up", "-d", env=env, timeout=900)
    node = stack.client.containers.get(stack("ps", "-q", "supernode-2", env=env).stdout.strip())
    deadline = time.monotonic() + 900
    while "Receiving: train message" not in node.logs(since=since).decode(errors="replace"):
        assert time.monotonic() < deadline, dump_logs(stack)
        time.sleep(2)
    node.kill()  # the robot host loses power while training round 1
    stack("up", "-d", "supernode-2", env=env, timeout=300)
    code, _ = stack.run(env)  # `up -d` again is a no-op for running services; then wait for the end
    assert code == 0, dump_logs(stack)
    got = outputs(stack, "kill-node", 3)
    assert got["rounds"] == [0, 1, 2, 3]
    assert got["contributors"]["1"] == ["node-0", "node-1", "node-3"]
    for r in ("2", "3"):
        assert got["contributors"][r] == [f"node-{i}" for i in range(4)]
    assert got["checkpoints"] == ["round-001", "round-002", "round-003"]
