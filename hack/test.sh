#!/usr/bin/env bash
# The whole test suite, as CI runs it: install, lint, type-check, test. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
hack/install.sh --test
hack/install-testenv.sh
.venv/bin/ruff check dra_cpu tests hack
.venv/bin/ruff format --check dra_cpu tests hack
.venv/bin/mypy --strict dra_cpu tests hack
# The slowest tests are listed at the end, to keep CI's time in view.
exec .venv/bin/pytest -q -ra --durations=25 "$@"
