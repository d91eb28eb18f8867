#!/usr/bin/env bash
# Set up (if needed), write the offline demo and run the three-round federation on this host.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/zk0 demo
exec .venv/bin/zk0 local --env-file experiments/demo.env
