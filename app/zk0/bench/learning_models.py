"""`zk0 bench learning`'s reference models and scoring: local-only and centralized training, and every model scored
on every evaluation set through that set's camera map, as the federation itself scores."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from ..cameras import parse_camera_map
from ..data import batch_stream, eval_batches, open_dataset
from ..evaluate import evaluate_policy
from ..model import load_policy, load_processors
from ..node.session import NodeSession, open_session, train_on_node
from ..settings import NodeSettings, ServerSettings
from ..train import train_round
from .learning_arms import plans
from .learning_report import COLUMNS, METRICS, NODES, SERVER, UNION

log = logging.getLogger("zk0")


def node_sessions(demo: dict, s: ServerSettings, base_state: dict) -> list[NodeSession]:
    """Each node's session with the base weights and the very split its SuperNode makes."""
    # The thread count `zk0 local` gives each of four nodes on this host: more threads than free
    # cores make OpenMP spin, and a busy shared host then trains tens of times slower.
    threads = max(1, (os.cpu_count() or 1) // len(NODES))
    nodes = [
        NodeSettings(dataset=str(demo["datasets"][n]), cameras=demo["cameras"][n], name=n, torch_threads=threads)
        for n in NODES
    ]
    return [open_session(node, str(demo["base-policy"]), base_state, s.seed) for node in nodes]


def eval_sets(demo: dict, sessions: list[NodeSession], config, s: ServerSettings) -> dict[str, list[dict]]:
    """Fixed batches of each node's held-out episodes and of the server set, built as the federation does."""
    sets = {
        name: eval_batches(x.dataset(x.heldout_episodes), s.batch_size, s.eval_batches)
        for name, x in zip(NODES, sessions, strict=True)
    }
    sets[SERVER] = eval_batches(open_dataset(str(demo["datasets"][SERVER]), config), s.batch_size, s.eval_batches)
    return sets


def evaluate_model(policy, path: str, stats: dict | None, *, sets: dict, cameras: dict, seed: int) -> dict:
    """The server's metrics on every set, plus the sample-weighted mean over the node held-out sets.

    Each set goes through the processors saved at `path` with that set's camera map and `stats`
    (None: the statistics saved there), as the model's own run would have normalised.
    """
    device, row = str(next(policy.parameters()).device), {}
    for name, batches in sets.items():
        pre, post = load_processors(path, device, parse_camera_map(cameras[name]), stats)
        row[name] = evaluate_policy(policy, pre, post, batches, seed)
    n = sum(row[name]["num-samples"] for name in NODES)
    row[UNION] = {m: sum(row[k][m] * row[k]["num-samples"] for k in NODES) / n for m in METRICS}
    row[UNION]["num-samples"] = n
    return {col: row[col] for col in COLUMNS}


def train_local_only(sessions: list[NodeSession], own_stats: list[str], s: ServerSettings) -> list[int]:
    """Train each node's model on its own episodes with the node's code and statistics, in place; steps per model."""
    steps = []
    for session, stats in zip(sessions, own_stats, strict=True):
        session.use_stats(stats)
        done = 0
        for _, plan, seed in plans(s):
            done += train_on_node(session, plan, s.batch_size, seed)[1]["steps"]
        steps.append(int(done))
        log.info("local-only %s: %d steps", session.settings.display_name, done)
    return steps


def mixed_batches(sources: list[tuple], frames: list[int], seed: int, drawn: list[int]):
    """Endless preprocessed batches from (raw stream, preprocessor) per node, each node drawn in proportion to its
    frames."""
    rng, p = np.random.default_rng(seed), np.asarray(frames) / sum(frames)
    while True:
        i = int(rng.choice(len(sources), p=p))
        drawn[i] += 1
        stream, pre = sources[i]
        yield pre(next(stream))


def _as_is(batch: dict) -> dict:
    return batch


def train_centralized(sessions: list[NodeSession], merged: dict, frames: list[int], s: ServerSettings):
    """One model on the union of the nodes' training episodes; (policy, steps, batches drawn per node)."""
    base, device = sessions[0].base, str(next(sessions[0].policy.parameters()).device)
    policy = load_policy(base, device)
    # The nodes' samples cannot share a batch (other camera names; node-2 has one camera), so each batch
    # is one node's, drawn with probability proportional to its training frames (what sampling the union
    # uniformly gives in expectation) and preprocessed with that node's camera map and the merged
    # statistics; train_round gets it preprocessed. Each node's stream is the one train_on_node shuffles.
    pres = [load_processors(base, device, x.settings.cameras, merged)[0] for x in sessions]
    done, drawn = 0, [0] * len(sessions)
    for _, plan, seed in plans(s):
        torch.manual_seed(seed)  # flow-matching noise seeded like the batches, as train_on_node does
        streams = [batch_stream(x.dataset(x.train_episodes), s.batch_size, seed) for x in sessions]
        sources = list(zip(streams, pres, strict=True))
        done += train_round(policy, _as_is, mixed_batches(sources, frames, seed, drawn), plan)["steps"]
    log.info("centralized: %d steps on %d frames, batches per node %s", done, sum(frames), drawn)
    return policy, int(done), drawn
