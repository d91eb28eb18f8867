"""Flower ServerApp: build the runtime and the strategy, run the rounds."""

from __future__ import annotations

import json
import logging
import textwrap
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..errors import RunFailed
from ..logs import setup_logging
from ..node_faults import faults_file
from ..settings import ServerSettings
from .adaptive import mu_schedule
from .grid import PromptGrid
from .influence import Limits
from .privacy import PrivateMean, private
from .robust import robust_rule
from .runtime import ServerRuntime
from .secagg import Zk0SecAggPlus, secaggplus_workflow
from .server_opt import Zk0ServerOpt, server_optimizer
from .strategy import Zk0FedProx, error_reason, replying_node

app = ServerApp()


def collect_stats(
    grid: Grid, config: dict, min_nodes: int, timeout: float, faults: Path | None = None,
) -> list[tuple[str, str | None, str]]:
    """Ask every connected node for its training statistics; (node name, stats JSON or None, why not) per node."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise RunFailed(
                f"{len(nodes)} node(s) connected within {timeout:.0f}s, ZK0_MIN_NODES={min_nodes} are required"
            )
        time.sleep(1)
    query = [Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=node, message_type=MessageType.QUERY)
             for node in nodes]
    replies, answered = [], set()
    for reply in grid.send_and_receive(query, timeout=timeout):
        node_id = replying_node(reply, [m.metadata for m in query])
        answered.add(node_id)
        if reply.has_error():
            replies.append((str(node_id), None, f"error: {error_reason(node_id, reply, faults)}"))
        else:
            node = reply.content["node"]
            replies.append((str(node["name"]), str(node["stats"]), ""))
    replies += [(str(n), None, f"no reply within {timeout:.0f}s") for n in nodes if n not in answered]
    for name, _, why in replies:
        if why:
            logging.getLogger("zk0").warning("node %s sent no statistics: %s", name, why)
    return replies


def build_strategy(settings: ServerSettings, runtime: ServerRuntime) -> Zk0FedProx:
    """FedProx with zk0's hooks, under the server optimiser ZK0_STRATEGY names or run as Flower's SecAgg+, counting
    rounds after the checkpoint."""
    hooks = dict(
        recorder=runtime.recorder,
        is_eval_round=settings.is_eval_round,
        proximal_mu=settings.proximal_mu,
        mu_schedule=mu_schedule(settings),  # None unless ZK0_ADAPTIVE_MU is on
        round_offset=runtime.start_round,
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_train,  # evaluation sends the whole model too: same share of nodes
        min_train_nodes=settings.min_nodes,
        min_evaluate_nodes=settings.min_nodes,
        min_available_nodes=settings.min_nodes,
        weighted_by_key="num-samples",
        wire_format=settings.wire_format,
        layout_tag=runtime.adapter.tag(),
        faults=faults_file(settings.output_dir),
        eval_in_train=settings.eval_mode == "in-train",
        last_round=settings.num_rounds,
        after_node_eval=runtime.log_round,
        limits=Limits(max_share=settings.max_node_share, max_samples=settings.local_steps * settings.batch_size,
                      norm_factor=settings.norm_bound_factor, node_frames=runtime.node_frames),
        rule=robust_rule(settings),  # None: the weighted mean
        stats=lambda: runtime.stats,  # merged after the strategy is built (collect_stats)
    )
    if settings.secure_aggregation == "secaggplus":  # the settings refuse it with limits, robust rules, optimisers
        return Zk0SecAggPlus(secaggplus_workflow(settings), **hooks)
    optimizer = server_optimizer(settings)  # None for ZK0_STRATEGY=fedprox: the mean is the server step
    privacy = PrivateMean.maybe(settings, runtime.start_round)  # None unless ZK0_DP is on
    cls = Zk0FedProx if optimizer is None else Zk0ServerOpt
    strategy = (private(cls) if privacy else cls)(*([optimizer] if optimizer else []), **hooks)
    strategy.privacy = privacy
    return strategy


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedProx (alone or under a Flower server optimiser) over SmolVLA's trainable weights, evaluating and
    checkpointing as configured."""
    log = setup_logging()
    grid = PromptGrid(grid)  # replies are collected within a quarter second, not up to 3 s late
    settings = ServerSettings.from_flower_config(dict(context.run_config))
    runtime = ServerRuntime(settings)
    # Several lines of at most ~200 characters: one line with every setting ran past a thousand.
    lines = textwrap.wrap(json.dumps(settings.model_dump(mode="json")), 200)
    for i, line in enumerate(lines):
        log.info("settings (%d/%d): %s", i + 1, len(lines), line)
    strategy = build_strategy(settings, runtime)
    first, last = strategy.experiment_round(1), settings.num_rounds
    if 1 < first <= last:  # Flower's own log counts this run's rounds from 1
        span = f"round {first}" if first == last else f"rounds {first} to {last}"
        log.info("%s of %d to go: Flower's [ROUND 1/%d] is round %d", span, last, last - first + 1, first)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        experiment_round = strategy.experiment_round(server_round)
        metrics = runtime.end_round(experiment_round, arrays.to_torch_state_dict())
        if server_round > 0:
            log.info("round %d of %d done", experiment_round, settings.num_rounds)
        return MetricRecord(metrics) if metrics else None

    exit_code = 1
    try:
        if settings.stats == "federated" and not runtime.stats:
            replies = collect_stats(grid, runtime.train_config(), settings.min_nodes, settings.round_timeout,
                                    faults_file(settings.output_dir))
            runtime.merge_node_stats(replies)
        config = ConfigRecord(runtime.train_config())
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(runtime.initial_state()),
            num_rounds=last - first + 1,
            timeout=settings.round_timeout,
            train_config=config,
            evaluate_config=config,
            evaluate_fn=evaluate_fn,
        )
        exit_code = 0
    finally:
        runtime.plotter.wait()
        runtime.tracker.finish(exit_code)
    log.info("run finished: outputs in %s", runtime.out_dir)
