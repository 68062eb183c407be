#!/usr/bin/env bash
# Static checks: ruff (lint) and mypy over the package and the scripts, with the settings in
# pyproject.toml. Run by .ci/run before the tests; installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m ruff check cryptfs scripts
python3 -m mypy
echo "check: ruff and mypy clean"
