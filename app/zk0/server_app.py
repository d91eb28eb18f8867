"""Flower ServerApp: build the runtime and the strategy, run the rounds."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from .logs import setup_logging
from .server import ServerRuntime
from .settings import ServerSettings
from .strategy import Zk0FedProx

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedProx over SmolVLA's trainable weights, evaluating and checkpointing as configured."""
    log = setup_logging()
    settings = ServerSettings.from_flower_config(dict(context.run_config))
    runtime = ServerRuntime(settings)
    log.info("settings: %s", settings.model_dump_json())
    strategy = Zk0FedProx(
        recorder=runtime.recorder,
        is_eval_round=settings.is_eval_round,
        proximal_mu=settings.proximal_mu,
        fraction_train=settings.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=settings.min_nodes,
        min_evaluate_nodes=settings.min_nodes,
        min_available_nodes=settings.min_nodes,
        weighted_by_key="num-samples",
        wire_format=settings.wire_format,
    )

    strategy.round_offset = runtime.start_round

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        metrics = runtime.end_round(server_round + runtime.start_round, arrays.to_torch_state_dict())
        return MetricRecord(metrics) if metrics else None

    config = ConfigRecord(runtime.train_config())
    exit_code = 1
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(runtime.initial_state()),
            num_rounds=settings.num_rounds - runtime.start_round,
            timeout=settings.round_timeout,
            train_config=config,
            evaluate_config=config,
            evaluate_fn=evaluate_fn,
        )
        exit_code = 0
    finally:
        runtime.tracker.finish(exit_code)
    log.info("run finished: outputs in %s", runtime.out_dir)
