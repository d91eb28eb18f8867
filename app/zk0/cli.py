"""The `zk0` command: demo assets, local federation."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .deploy.node_watch import GIVE_UP_AFTER
from .deploy.supernode import UnreachableError
from .errors import DatasetError, OutputInUse
from .logs import setup_logging
from .settings import SettingsError

DEFAULT_DEMO_DIR = Path("demo-data")


def _demo(args: argparse.Namespace) -> int:
    if args.sim:
        from .sim.cli import run_demo

        return run_demo(args)
    from .demo import write_demo

    paths = write_demo(args.out, episodes=args.episodes, frames=args.frames, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .deploy.preflight import preflight

    preflight(args.env_file)
    print("zk0 check: every dataset can be used")
    return 0


def _local(args: argparse.Namespace) -> int:
    from .deploy.local import run_local

    return run_local(args.env_file, args.tls, args.simulation, fast_loop=args.fast_loop)


def _supernode(args: argparse.Namespace) -> int:
    from .deploy.supernode import run_supernode

    return run_supernode(args)


def _submit(args: argparse.Namespace) -> int:
    from .deploy.submit import submit_and_wait

    return submit_and_wait(
        args.superlink, args.env_file, args.app, args.root_certificates, args.connect_tries, args.connect_wait
    )


def _push(args: argparse.Namespace) -> int:
    import os

    from .server.publish import push_checkpoint

    if not (args.checkpoint / "config.json").is_file():
        raise SettingsError(f"{args.checkpoint} is not a checkpoint directory (no config.json)")
    info = args.checkpoint / "zk0.json"
    server_round = json.loads(info.read_text())["round"] if info.is_file() else 0
    oid = push_checkpoint(
        args.checkpoint, args.repo_id, server_round, token=os.environ.get("HF_TOKEN"), private=args.private
    )
    print(f"pushed {args.checkpoint} to {args.repo_id} (commit {oid}, tag round-{server_round:03d})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.name == "learning":
        from .bench.learning import main as bench_main

        return bench_main(args.rest)
    if args.name == "attack":
        from .bench.attack import main as bench_main

        return bench_main(args.rest)
    if args.name == "privacy":
        from .bench.privacy import main as bench_main

        return bench_main(args.rest)
    from .bench.perf import main as bench_main

    return bench_main([args.name, *args.rest])


def _add_supernode_parser(sub) -> None:
    node = sub.add_parser(
        "supernode",
        help="join a federation from this host (robot host, SuperNode container)",
        description="Check this node's settings (ZK0_DATASET, ZK0_HELDOUT_EPISODES, ... from the environment or "
        "--env-file) and its dataset, check that the SuperLink answers (a bounded retry), then run "
        "flower-supernode with these settings as --node-config. Once joined, the node "
        "reconnects by itself whenever the SuperLink restarts. Exit codes: 2 bad settings or dataset, "
        "3 SuperLink unreachable, 4 its ClientApp never started (see --give-up-after); otherwise "
        "flower-supernode's.",
        epilog="example: ZK0_DATASET=lerobot/svla_so100_pickplace zk0 supernode "
        "--superlink superlink.example.org:8000 --root-certificates ca.crt --auth-key node-0",
    )
    node.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's Fleet API address")
    node.add_argument(
        "--env-file", type=Path, default=None, help="node settings (ZK0_DATASET, ...); the shell outranks it"
    )
    node.add_argument(
        "--index", type=int, default=None, metavar="N",
        help="read this node's settings from ZK0_NODE_<N>_* (as `zk0 local` and the Compose services do; they "
        "outrank ZK0_<FIELD>) instead of ZK0_DATASET, ZK0_NAME, ...",
    )
    node.add_argument(
        "--root-certificates", type=Path, default=None, metavar="CA_CRT",
        help="the federation's CA certificate (ca.crt from superlink/make-certs.sh): connect with TLS. "
        "Without it the node connects insecurely, with a warning",
    )
    node.add_argument(
        "--auth-key", type=Path, default=None, metavar="KEY",
        help="this node's private key (supernodes/node-<i> from make-certs.sh), whose .pub the SuperLink has "
        "registered",
    )
    node.add_argument(
        "--connect-tries", type=int, default=10, help="attempts to reach the SuperLink before giving up (default 10)"
    )
    node.add_argument("--connect-wait", type=float, default=3.0, help="seconds between attempts (default 3)")
    node.add_argument(
        "--host", default="127.0.0.1", help="host of this node's runtime API for its ClientApps (default 127.0.0.1)"
    )
    node.add_argument("--port", type=int, default=9094, help="port of this node's runtime API (default 9094)")
    node.add_argument("--give-up-after", type=float, default=GIVE_UP_AFTER, metavar="SECONDS",
                      help="stop the SuperNode and exit 4 when its ClientApp has failed to start and still not started "
                      f"this long after a message arrived, as `zk0 local` gives up (default {GIVE_UP_AFTER:.0f})")
    node.add_argument(
        "--fast-loop", action="store_true",
        help="run zk0's fast loop (0.25 s polls, ClientApps forked from a process that has imported Flower; "
        "leans on Flower 1.42's private code and falls back to Flower's own where it does not fit) instead of "
        "Flower's own flower-supernode and SuperExec (default)",
    )
    node.set_defaults(func=_supernode)


def _add_submit_parser(sub) -> None:
    submit = sub.add_parser(
        "submit",
        help="submit the experiment to a running SuperLink, stream its log, wait for the end",
        description="Read the experiment's ZK0_ settings (environment, then --env-file), check them, wait for the "
        "SuperLink (a bounded retry), `flwr run` the app with them as run config, stream the run's log and exit "
        "0 only when the run completed (1 failed or stopped, 2 bad settings, 3 SuperLink unreachable).",
    )
    submit.add_argument("--superlink", required=True, metavar="HOST:PORT",
                        help="the SuperLink's address, e.g. superlink:8000")
    submit.add_argument("--env-file", type=Path, default=None, help="experiment settings; the environment outranks it")
    submit.add_argument("--app", type=Path, default=None,
                        help="the Flower App folder (default: this checkout's app/ or the image's)")
    submit.add_argument("--root-certificates", type=Path, default=None, metavar="CA_CRT",
                        help="CA certificate for a TLS SuperLink")
    submit.add_argument("--connect-tries", type=int, default=30, help="attempts to reach the SuperLink (default 30)")
    submit.add_argument("--connect-wait", type=float, default=2.0, help="seconds between attempts (default 2)")
    submit.set_defaults(func=_submit)


def _add_demo_check_local_parsers(sub) -> None:
    demo = sub.add_parser("demo", help="write the offline demo: four synthetic SO-100 datasets and a tiny SmolVLA")
    demo.add_argument("--out", type=Path, default=DEFAULT_DEMO_DIR, help="target folder (default: demo-data)")
    demo.add_argument("--episodes", type=int, default=8, help="episodes per node dataset")
    demo.add_argument("--sim", action="store_true",
                      help="record the simulated labs' datasets with the SO-101 simulator's expert instead (under "
                      "OUT/sim; needs pip install 'zk0[sim]'); see experiments/sim.env")
    demo.add_argument("--frames", type=int, default=40, help="frames per episode")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    check = sub.add_parser(
        "check",
        help="check an experiment's datasets against the base policy; print one table; list every problem",
        description="Read the env-file's nodes (ZK0_NODE_<i>_*) and evaluation set, compare each dataset's format, "
        "fps, episodes, cameras (after ZK0_NODE_<i>_CAMERAS / ZK0_EVAL_CAMERAS) and state/action sizes with the base "
        "policy, print one table and exit 2 listing every problem (0 when every dataset can be used). Reads only "
        "metadata files: no frames, no model.",
    )
    check.add_argument("--env-file", type=Path, default=None, help="experiment settings, e.g. experiments/demo.env")
    check.set_defaults(func=_check)
    local = sub.add_parser("local", help="run a federation of real Flower processes on this host")
    local.add_argument("--env-file", type=Path, default=None, help="experiment settings, e.g. experiments/demo.env")
    local.add_argument(
        "--tls", type=Path, default=None, metavar="DIR",
        help="TLS and SuperNode authentication with the files superlink/make-certs.sh wrote to DIR "
        "(default: insecure, for one workstation only)",
    )
    local.add_argument(
        "--simulation", type=int, default=None, metavar="N",
        help="N virtual SuperNodes in Flower's simulation runtime instead of real ones (virtual node k trains on "
        "the env-file's node k mod D); needs Flower's simulation extra (ray)",
    )
    local.add_argument(
        "--fast-loop", action=argparse.BooleanOptionalAction, default=True,
        help="run the SuperNodes with zk0's fast loop: 0.25 s polls, ClientApps forked from a process that has "
        "imported Flower (default); --no-fast-loop runs Flower's own flower-supernode and SuperExec",
    )
    local.set_defaults(func=_local)


def _add_push_bench_parsers(sub) -> None:
    push = sub.add_parser("push", help="push a checkpoint directory to the Hugging Face Hub (uses HF_TOKEN)")
    push.add_argument("checkpoint", type=Path, help="e.g. outputs/demo/checkpoints/round-003")
    push.add_argument("--repo-id", required=True, help="owner/name on the Hub")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.set_defaults(func=_push)
    names = ["learning", "attack", "privacy", "wire", "step", "overhead", "aggregate", "demo", "scale", "cli", "gpu"]
    bench = sub.add_parser("bench", help=f"benchmarks: {', '.join(names)} (see docs/benchmarks.md)")
    bench.add_argument("name", choices=names)
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options (--help for each)")
    bench.set_defaults(func=_bench)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `zk0` console script."""
    parser = argparse.ArgumentParser(prog="zk0", description="Federated SmolVLA fine-tuning with Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    # In this order in `zk0 --help`.
    _add_demo_check_local_parsers(sub)
    _add_supernode_parser(sub)
    _add_submit_parser(sub)
    _add_push_bench_parsers(sub)
    from .sim.cli import add_eval_parser

    add_eval_parser(sub)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        return args.func(args)
    except (SettingsError, DatasetError, OutputInUse) as err:
        print(f"zk0: {err}", file=sys.stderr)
        return 2
    except UnreachableError as err:
        print(f"zk0: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
