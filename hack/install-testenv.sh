#!/usr/bin/env bash
# Installs every real component the tests run against (API server, container runtimes, ...).
# Each hack/testenv/<component>.sh knows how to `install` itself; downloads and builds are cached
# under /var/cache/dra-cpu-testenv so that a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
for script in hack/testenv/*.sh; do
  echo "testenv: installing $(basename "$script" .sh)" >&2
  bash "$script" install
done
