"""ZK0_SECURE_AGGREGATION=secaggplus on a real local federation: Flower's SecAgg+ inside zk0's strategy loop.

Three SuperNodes on loopback train one round; node-2 is stopped once it has shared its keys and started
training (the protocol's masked-vector stage), so the server must unmask the other two with the key shares
node-2 left with them. Each node keeps, on its own side, the update it sent (ZK0_NODE_<i>_SECAGG_KEEP_DIR); the
new global model must be the base plus the plain mean of the two survivors' updates, within SecAgg+'s
quantisation step, while what reached the server from the nodes was masked vectors only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import numpy as np
import pytest
from federation import ZK0, write_env
from safetensors.numpy import load_file
from test_faults import superlink_port, supernode_pid, wait_until

from zk0.settings import ServerSettings

STEP = 2 * 8.0 / 2**22  # one quantisation step at the default ZK0_SECAGG_CLIPPING_RANGE (8) and Flower's 2^22


def test_refuses_every_setting_it_cannot_honour_at_once():
    with pytest.raises(ValueError) as err:
        ServerSettings(secure_aggregation="secaggplus", aggregation="krum", wire_format="int8-delta", min_nodes=1)
    for name in ("MAX_NODE_SHARE", "NORM_BOUND_FACTOR", "AGGREGATION", "WIRE_FORMAT", "MIN_NODES"):
        assert f"ZK0_{name}=" in str(err.value)


def _trainable_flat(state: dict, names: list[str]) -> np.ndarray:
    return np.concatenate([state[n].astype(np.float32).reshape(-1) for n in names])


def test_secaggplus_round_survives_a_dropout_and_equals_the_plain_mean(demo, tmp_path):
    out, keep = tmp_path / "out", tmp_path / "keep"
    env_file = write_env(
        tmp_path / "secagg.env", demo, out, nodes=3, ZK0_NUM_ROUNDS=1, ZK0_MIN_NODES=2, ZK0_LOCAL_STEPS=20,
        ZK0_EVAL_BATCHES=1, ZK0_SECURE_AGGREGATION="secaggplus", ZK0_MAX_NODE_SHARE=1, ZK0_NORM_BOUND_FACTOR=0,
        **{f"ZK0_NODE_{i}_SECAGG_KEEP_DIR": keep / str(i) for i in range(3)},
    )
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    with open(tmp_path / "zk0.log", "wb") as log:
        run = subprocess.Popen([*ZK0, "local", "--env-file", str(env_file)], stdout=log, stderr=subprocess.STDOUT,
                               env=env)
    try:
        node_log = out / "local" / "logs" / "supernode-2.log"
        # Only the masked-vector stage reaches zk0's train handler: the other stages are secaggplus_mod's own.
        wait_until(lambda: node_log.exists() and "ClientApp started for the train" in node_log.read_text(), 600,
                   "node-2 starting to train in the SecAgg+ round")
        os.killpg(supernode_pid(superlink_port(out), "node-2"), signal.SIGTERM)
        assert run.wait(timeout=600) == 0, (tmp_path / "zk0.log").read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
    record = json.loads((out / "history.json").read_text())[1]
    assert record["secagg"]["masked_vectors"] == 2 and record["secagg"]["dropped"] == 1
    assert "dropped out of the SecAgg+ round" in next(iter(record["excluded"].values()))
    # What reached the server from the nodes: SecAgg+'s masked vectors, no plain weights beside them.
    assert record["secagg"]["plain_array_bytes"] == 0 and record["secagg"]["masked_bytes"] > 0
    assert not (keep / "2" / "round-001.npy").exists()  # node-2 never sent its update
    updates = [np.load(keep / str(i) / "round-001.npy") for i in (0, 1)]
    base = load_file(os.path.join(demo["base-policy"], "model.safetensors"))
    new = load_file(str(out / "checkpoints" / "round-001" / "model.safetensors"))
    names = sorted(n for n in new if n in base and not np.array_equal(new[n], base[n]))
    delta = _trainable_flat(new, names) - _trainable_flat(base, names)
    assert delta.size == updates[0].size  # every trained weight moved, and only those
    mean = (updates[0] + updates[1]) / 2  # both claim ZK0_LOCAL_STEPS x ZK0_BATCH_SIZE samples: equal weights
    assert np.abs(mean).max() > 1000 * STEP  # the updates are far above the quantisation step
    assert np.abs(delta - mean).max() < 2 * STEP
    assert np.abs(delta - updates[0]).max() > 100 * STEP  # not one node's update: the mean of both
