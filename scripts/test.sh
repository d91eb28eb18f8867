#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite; fails when no test ran.
set -euo pipefail
# Normal scheduling for everything below: Go programs (docker, compose) livelock under a realtime policy.
chrt -o -p 0 $$ 2>/dev/null || true
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Docker engine, Compose v2 and the zk0 image for tests/test_compose.py. Where Docker cannot be made
# ready, those tests report themselves skipped, unless REQUIRE_DOCKER=1 (CI) makes them fail.
# The fast tier (-m "not slow") starts no container: no Docker setup for it.
if [[ " $* " == *"not slow"* ]]; then
    echo "test.sh: fast tier; Docker setup skipped" >&2
elif ! ./scripts/docker-setup.sh; then
    [[ "${REQUIRE_DOCKER:-0}" == 1 ]] && { echo "test.sh: Docker is required (REQUIRE_DOCKER=1) but could not be set up" >&2; exit 1; }
    echo "test.sh: Docker not available; the Compose tests will be skipped" >&2
fi
# Lint before the (long) tests: the rules and the 120-character lines are configured in app/pyproject.toml.
if ! .venv/bin/ruff check --config app/pyproject.toml app tests scripts; then
    echo "test.sh: ruff check failed (see the findings above); fix them or add a '# noqa: RULE' with a reason" >&2
    exit 1
fi
# The rooms of ARCHITECTURE.md (.importlinter): `zk0` resolved to this checkout's app/, whatever is installed.
if ! PYTHONPATH="$PWD/app" .venv/bin/lint-imports --no-cache --no-logo .importlinter; then
    echo "test.sh: lint-imports failed: an import points up a room (see ARCHITECTURE.md and .importlinter)" >&2
    exit 1
fi
# The docs site (mkdocs.yml, docs/), built into a temporary folder: --strict fails on a broken link or anchor.
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
if ! NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict -d "$site"; then
    echo "test.sh: mkdocs build --strict failed: fix the links or anchors the warnings above name (docs/, mkdocs.yml);" \
         "the generated pages come from .venv/bin/python scripts/reference_docs.py" >&2
    exit 1
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
.venv/bin/python -m pytest tests -q -rs --durations=15 "$@"
