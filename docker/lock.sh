#!/usr/bin/env bash
# Regenerate docker/requirements.txt from the project venv (scripts/setup.sh), without test-only packages.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
{
    echo "# Pinned runtime dependencies of the zk0 image: a \`pip freeze\` of a venv built by scripts/setup.sh,"
    echo "# without the test-only packages. Regenerate: docker/lock.sh"
    .venv/bin/pip freeze --exclude-editable | grep -v -i -E "^(pytest|docker|iniconfig|pluggy)=="
} > docker/requirements.txt
