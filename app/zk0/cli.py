"""The `zk0` command: demo assets, local federation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .logs import setup_logging
from .data import DatasetError
from .settings import SettingsError

DEFAULT_DEMO_DIR = Path("demo-data")


def _demo(args: argparse.Namespace) -> int:
    from .demo import write_demo

    paths = write_demo(args.out, episodes=args.episodes, frames=args.frames, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _local(args: argparse.Namespace) -> int:
    from .local import run_local

    return run_local(args.env_file)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `zk0` console script."""
    parser = argparse.ArgumentParser(prog="zk0", description="Federated SmolVLA fine-tuning with Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write the offline demo: four synthetic SO-100 datasets and a tiny SmolVLA")
    demo.add_argument("--out", type=Path, default=DEFAULT_DEMO_DIR, help="target folder (default: demo-data)")
    demo.add_argument("--episodes", type=int, default=8, help="episodes per node dataset")
    demo.add_argument("--frames", type=int, default=40, help="frames per episode")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    local = sub.add_parser("local", help="run a federation of real Flower processes on this host")
    local.add_argument("--env-file", type=Path, default=None, help="experiment settings, e.g. experiments/demo.env")
    local.set_defaults(func=_local)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        return args.func(args)
    except (SettingsError, DatasetError) as err:
        print(f"zk0: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
