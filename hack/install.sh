#!/usr/bin/env bash
# Installs dra-cpu into .venv (Python >= 3.11). `--test` adds what the test suite needs.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--test" ]] && extras="[test,bench]"

if ! python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null || ! python3 -m venv --help >/dev/null 2>&1; then
  echo "install: python3 >= 3.11 with venv is needed; installing Debian's python3-venv" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)${extras}"
if [[ ! -f "$stamp" ]]; then
  log=$(mktemp)
  trap 'rm -f "$log"' EXIT
  pip_install() {
    if ! .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
      grep -v '^WARNING: Location' "$log" | tail -40 >&2
      echo "install: pip install $* failed (above)" >&2
      exit 1
    fi
  }
  pip_install --upgrade pip
  pip_install -e ".${extras}"
  .venv/bin/python -c 'import dra_cpu.cli' || { echo "install: dra-cpu did not install" >&2; exit 1; }
  touch "$stamp"
fi
