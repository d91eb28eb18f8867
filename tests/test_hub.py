"""Hub ids end to end: `zk0 check`, `zk0 supernode` and `zk0 local` on policies and datasets named by Hub id,
downloaded by the real huggingface_hub client from a local stand-in of the Hub (tests/hub_downloads.py).

The Hub itself cannot be reached from here: HF_ENDPOINT points every zk0 process at the stand-in, which
serves the demo's own base policy and datasets from disk. Each test gets its own Hub cache (HF_HOME).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from federation import ZK0
from hub_downloads import Cut, HubDownloads

BIG = 12 * 2**20  # huggingface_hub writes in 10 MiB chunks: only a file past one chunk shows a resume
CLOSED_PORT = "127.0.0.1:9"  # discard: nothing listens, so `zk0 supernode` stops after its downloads


def _portable_policy(demo: dict, folder: Path) -> Path:
    """The demo's base policy as a Hub repo holds a policy: its VLM folder inside, named relatively."""
    shutil.copytree(demo["base-policy"], folder)
    shutil.copytree(demo["vlm"], folder / "vlm")
    for name, key in (("config.json", "vlm_model_name"), ("policy_preprocessor.json", "tokenizer_name")):
        text = (folder / name).read_text().replace(json.dumps(str(demo["vlm"])), json.dumps("vlm"))
        (folder / name).write_text(text)
        assert f'"{key}": "vlm"' in text
    return folder


@pytest.fixture(scope="module")
def hub(demo, tmp_path_factory):
    """The stand-in serving: a policy, a dataset with two commits (v3.0 tag on the older), a v2.1 dataset,
    a private evaluation set, a dataset with a 12 MiB file and a dataset repo that is not a LeRobot dataset."""
    root = tmp_path_factory.mktemp("hub-repos")
    big = root / "big"
    shutil.copytree(demo["datasets"]["node-2"], big)
    (big / "padding.bin").write_bytes(np.random.default_rng(0).bytes(BIG))
    with HubDownloads() as server:
        server.add("lab/tiny-smolvla", "model", _portable_policy(demo, root / "policy"))
        server.commits_of = {
            "v3.0": server.add("lab/pick", "dataset", demo["datasets"]["node-0"], tags=("v3.0",)),
            "main": server.add("lab/pick", "dataset", demo["datasets"]["node-1"]),
        }
        server.add("lab/so100-v21", "dataset", demo["datasets"]["node-3"], tags=("v2.1",))
        server.add("lab/eval", "dataset", demo["datasets"]["server-eval"], private=True)
        server.add("lab/big", "dataset", big)
        server.add("lab/not-lerobot", "dataset", demo["vlm"])  # a dataset repo without meta/info.json
        yield server


def _env(hub: HubDownloads, home: Path, *, token: bool = False, offline: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "WANDB_MODE") and not k.startswith("ZK0_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="1" if offline else "0", HF_HOME=str(home / "hf"),
               XDG_CACHE_HOME=str(home / "cache"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    if token:
        env["HF_TOKEN"] = hub.token
    return env


def _zk0(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*ZK0, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _env_file(path: Path, _demo: dict, **values) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def _experiment(path: Path, demo: dict, out: Path, **extra) -> Path:
    """Two nodes and an evaluation set by Hub id: a pinned revision, a v2.1 dataset, a private repo."""
    return _env_file(path, demo, **{
        "ZK0_BASE_POLICY": "lab/tiny-smolvla",
        "ZK0_EVAL_DATASET": "lab/eval", "ZK0_EVAL_CAMERAS": demo["cameras"]["server-eval"],
        "ZK0_NODE_0_DATASET": "lab/pick@v3.0", "ZK0_NODE_0_CAMERAS": demo["cameras"]["node-0"],
        "ZK0_NODE_1_DATASET": "lab/so100-v21", "ZK0_NODE_1_CAMERAS": demo["cameras"]["node-3"],
        "ZK0_NUM_ROUNDS": 1, "ZK0_LOCAL_STEPS": 4, "ZK0_BATCH_SIZE": 4, "ZK0_MIN_NODES": 2,
        "ZK0_EVAL_BATCHES": 1, "ZK0_OUTPUT_DIR": out, "ZK0_DEVICE": "cpu", "WANDB_MODE": "disabled", **extra,
    })


def test_check_reads_hub_ids_at_their_revisions(hub, demo, tmp_path):
    # lab/pick's main holds node-1's cameras, its v3.0 tag node-0's: each camera map fits only its revision.
    env_file = _experiment(tmp_path / "hub.env", demo, tmp_path / "out",
                           ZK0_NODE_2_DATASET="lab/pick", ZK0_NODE_2_CAMERAS=demo["cameras"]["node-1"],
                           ZK0_NODE_3_DATASET=f"lab/pick@{hub.commits_of['v3.0']}",
                           ZK0_NODE_3_CAMERAS=demo["cameras"]["node-0"])
    res = _zk0("check", "--env-file", str(env_file), env=_env(hub, tmp_path, token=True))
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {line.split()[0]: line for line in res.stdout.splitlines() if line.startswith(("node-", "eval"))}
    assert "lab/so100-v21" in rows["node-1"] and "v2.1" in rows["node-1"] and "ok, converted on open" in rows["node-1"]
    assert "top->camera1" in rows["node-0"] and "top->camera1" in rows["node-3"]
    assert "laptop->camera1" in rows["node-2"] and rows["eval"].endswith("ok")


def test_check_refuses_every_hub_problem_at_once_saying_what_to_do(hub, demo, tmp_path):
    env_file = _env_file(tmp_path / "bad.env", demo, ZK0_BASE_POLICY="lab/no-such-policy",
                         ZK0_EVAL_DATASET="lab/eval",  # private, and no HF_TOKEN
                         ZK0_NODE_0_DATASET="lab/no-such-data", ZK0_NODE_1_DATASET="lab/pick@v9.9",
                         ZK0_NODE_2_DATASET="lab/pick@bad..rev", ZK0_NODE_3_DATASET="not-an-id",
                         ZK0_NODE_4_DATASET="lab/not-lerobot")
    res = _zk0("check", "--env-file", str(env_file), env=_env(hub, tmp_path))
    assert res.returncode == 2, res.stdout + res.stderr
    err = res.stderr
    assert "ZK0_BASE_POLICY=lab/no-such-policy: no model repo lab/no-such-policy on the Hub" in err
    assert "HF_TOKEN is not set; set HF_TOKEN to a token with read access to it, or check the id" in err
    assert "ZK0_EVAL_DATASET=lab/eval): no dataset repo lab/eval" in err
    assert "ZK0_NODE_0_DATASET=lab/no-such-data): no dataset repo lab/no-such-data" in err
    assert "lab/pick has no revision 'v9.9'" in err and "use one it has (main, v3.0) or a commit id" in err
    assert "ZK0_NODE_2_DATASET" in err and "revision 'bad..rev' is not a branch, tag or commit name" in err
    assert "ZK0_NODE_3_DATASET" in err and "'not-an-id' is neither a local folder" in err
    assert "lab/not-lerobot has no meta/info.json on the Hub" in err and "so it is not a LeRobot dataset" in err
    assert "bad.env:" in err  # each problem names its env-file line


def test_offline_before_any_download_is_refused_naming_hf_hub_offline(hub, demo, tmp_path):
    env_file = _env_file(tmp_path / "x.env", demo, ZK0_BASE_POLICY="lab/tiny-smolvla",
                         ZK0_NODE_0_DATASET="lab/pick", ZK0_NODE_0_CAMERAS=demo["cameras"]["node-1"])
    before = len(hub.requests)
    res = _zk0("check", "--env-file", str(env_file), env=_env(hub, tmp_path, offline=True))
    assert res.returncode == 2
    assert "ZK0_NODE_0_DATASET=lab/pick): not downloaded yet and HF_HUB_OFFLINE=1" in res.stderr
    assert "ZK0_BASE_POLICY=lab/tiny-smolvla: not downloaded yet" in res.stderr
    assert len(hub.requests) == before


def test_supernode_refuses_a_private_or_missing_repo_before_any_work(hub, demo, tmp_path):
    env_file = _env_file(tmp_path / "node.env", demo, ZK0_BASE_POLICY="lab/no-such-policy",
                         ZK0_NODE_0_DATASET="lab/eval", ZK0_NODE_0_CAMERAS=demo["cameras"]["server-eval"])
    res = _zk0("supernode", "--superlink", CLOSED_PORT, "--index", "0", "--env-file", str(env_file),
               "--connect-tries", "1", env=_env(hub, tmp_path))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "this SuperNode cannot start, 2 problem(s)" in res.stderr
    assert "no dataset repo lab/eval" in res.stderr and "no model repo lab/no-such-policy" in res.stderr
    assert "SuperLink" not in res.stderr  # refused before it tried to connect, let alone start Flower


def _node(hub, demo, tmp_path, env_name="node.env", **env_kw) -> subprocess.CompletedProcess:
    env_file = _env_file(tmp_path / env_name, demo, ZK0_NODE_0_DATASET="lab/big",
                         ZK0_NODE_0_CAMERAS=demo["cameras"]["node-2"])
    return _zk0("supernode", "--superlink", CLOSED_PORT, "--index", "0", "--env-file", str(env_file),
                "--connect-tries", "1", "--connect-wait", "0.1", env=_env(hub, tmp_path, **env_kw))


def _blob(tmp_path: Path, name: str) -> bytes:
    (path,) = (tmp_path / "hf" / "hub").glob(f"datasets--lab--big/snapshots/*/{name}")
    return path.read_bytes()


def test_a_connection_dropped_mid_file_is_resumed_from_the_byte_it_reached(hub, demo, tmp_path):
    hub.ranges.clear()
    hub.cut = Cut("padding.bin", after=11 * 2**20)
    try:
        res = _node(hub, demo, tmp_path)
    finally:
        hub.cut = None
    assert "ZK0_NODE_0_DATASET=lab/big: dataset at commit" in res.stdout, res.stdout + res.stderr
    assert hub.ranges == [("padding.bin", f"bytes={10 * 2**20}-")]  # one 10 MiB chunk was on disk
    (served,) = [path for repo in hub.served.values() for _, folder in repo.commits
                 if (path := folder / "padding.bin").is_file()]
    assert hashlib.sha256(_blob(tmp_path, "padding.bin")).digest() == hashlib.sha256(served.read_bytes()).digest()
    assert "SuperLink 127.0.0.1:9 is not reachable" in res.stderr  # the downloads came first, then the node


def test_the_hub_gone_mid_download_is_refused_and_the_next_run_completes_it(hub, demo, tmp_path):
    hub.cut = Cut("padding.bin", after=11 * 2**20, down=True)
    try:
        first = _node(hub, demo, tmp_path)
    finally:
        hub.cut = None
    assert first.returncode == 2, first.stdout + first.stderr
    assert "ZK0_NODE_0_DATASET=lab/big: cannot reach the Hub" in first.stderr
    assert "run the command again: files downloaded before are kept" in first.stderr
    kept = {p.name for p in (tmp_path / "hf" / "hub").glob("datasets--lab--big/snapshots/*/**/*") if p.is_file()}
    start = len(hub.requests)
    second = _node(hub, demo, tmp_path)
    assert "ZK0_NODE_0_DATASET=lab/big: dataset at commit" in second.stdout, second.stdout + second.stderr
    fetched = {r.rsplit("/", 1)[1] for r in hub.requests[start:] if r.startswith("GET") and "/resolve/" in r}
    assert "padding.bin" in fetched and not fetched & kept  # files finished before were not fetched again
    assert len(_blob(tmp_path, "padding.bin")) == BIG


def test_local_trains_on_hub_ids_then_offline_reuse_makes_no_request(hub, demo, tmp_path):
    out = tmp_path / "out"
    env_file = _experiment(tmp_path / "hub.env", demo, out)
    res = _zk0("local", "--env-file", str(env_file), env=_env(hub, tmp_path, token=True), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1] and len(history[1]["contributors"]) == 2
    pinned = hub.commits_of["v3.0"]
    assert f"ZK0_NODE_0_DATASET=lab/pick@v3.0: dataset at commit {pinned[:12]}" in res.stdout
    # The records name the commits the run trained on.
    datasets = sorted(c["dataset"] for c in history[1]["clients"].values())
    assert datasets[0] == f"lab/pick@{pinned}" and datasets[1].startswith("lab/so100-v21@")
    base = json.loads((out / "checkpoints" / "round-001" / "zk0.json").read_text())["base_policy"]
    assert base.startswith("lab/tiny-smolvla@")
    # The v2.1 dataset from the Hub was converted once into zk0's cache, as a local one is.
    assert list((tmp_path / "cache" / "zk0" / "datasets").glob("lab--so100-v21-*/zk0-converted.json"))

    # Offline: the same experiment's check and a node's downloads are served from the Hub cache alone.
    before = len(hub.requests)
    offline = _env(hub, tmp_path, offline=True)
    check = _zk0("check", "--env-file", str(env_file), env=offline)
    assert check.returncode == 0, check.stdout + check.stderr
    node = _zk0("supernode", "--superlink", CLOSED_PORT, "--index", "1", "--env-file", str(env_file),
                "--connect-tries", "1", env=offline)
    assert "ZK0_NODE_1_DATASET=lab/so100-v21: dataset at commit" in node.stdout, node.stdout + node.stderr
    assert hub.requests[before:] == []
