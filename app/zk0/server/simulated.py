"""The global model scored in the SO-101 simulator between rounds (ZK0_SIM_EVAL_EVERY), when that is on."""

from __future__ import annotations

import logging
from pathlib import Path

from ..settings import ServerSettings, SettingsError

log = logging.getLogger("zk0")


class SimScorer:
    """Success rates of the global model on each simulated lab's task; videos of the first episodes."""

    def __init__(self, settings: ServerSettings, out_dir: Path):
        from ..labs import parse_labs
        from ..sim import require

        self.settings, self.out_dir = settings, Path(out_dir)
        try:
            require()  # refused here, before round 0, when the simulator is missing
        except SettingsError as err:
            raise SettingsError(f"ZK0_SIM_EVAL_EVERY={settings.sim_eval_every}: {err}") from None
        self.labs = parse_labs(settings.sim_labs)

    @classmethod
    def maybe(cls, settings: ServerSettings, out_dir: Path) -> SimScorer | None:
        return cls(settings, out_dir) if settings.sim_eval_every > 0 else None

    def score(self, policy, stats: dict | None, server_round: int) -> tuple[dict, list[Path]]:
        """{lab: success figures, "all": pooled}; and the videos written (OUTPUT_DIR/videos/round-NNN/)."""
        from ..sim.evaluate import evaluate_labs

        s = self.settings
        videos = self.out_dir / "videos" / f"round-{server_round:03d}"
        result = evaluate_labs(policy, s.base_policy, stats, self.labs, s.sim_episodes, s.seed,
                               videos if s.sim_videos else None, s.sim_videos)
        log.info("round %d simulated success: %d/%d episodes (95%% CI %.2f-%.2f)", server_round,
                 result["all"]["successes"], result["all"]["episodes"], result["all"]["ci_low"],
                 result["all"]["ci_high"])
        return result, sorted(videos.glob("*.mp4")) if videos.is_dir() else []
