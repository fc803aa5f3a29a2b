#!/usr/bin/env bash
# The container image: its size, and how long the daemon takes from `podman run` to ready inside it.
#   hack/bench/image.sh          build (layers cached), then print the size and the start-up times
#   hack/bench/image.sh build    only build; prints the image name
# BASE=IMAGE picks the base image (default: the local Debian one from hack/testenv/image-base.sh, since no registry
# is reachable here). Readiness needs kubelet registration: the bench plays the kubelet, answering the daemon's
# registration socket with GetInfo + NotifyRegistrationStatus (dra_cpu.kubelet.client) from the host, then polls
# /readyz. The daemon runs in standalone mode (a folder for the API server) with enforcement off, on this machine's
# own /sys, uid 0, no capabilities and a read-only root filesystem, as the chart runs it.
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=localhost/dra-cpu:dev
BASE="${BASE:-$(bash hack/testenv/image-base.sh name)}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-/var/cache/dra-cpu-testenv/podman/containers.conf}"

build() {
  local work
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  # pip inside the build talks to PyPI through whatever TLS interception this machine has: lend it the host's CA
  # bundle for the build's RUN steps only (volumes are not part of the image).
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$work/pip.conf"
  podman build -q --network host --build-arg "BASE=$BASE" \
    -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro -v "$work/pip.conf:/etc/pip.conf:ro" \
    -t "$IMAGE" . >/dev/null
  echo "$IMAGE"
}

bench() {
  build >/dev/null
  local bytes
  bytes=$(podman image inspect --format '{{.Size}}' "$IMAGE")
  echo "image: $IMAGE from $BASE: $((bytes / 1000000)) MB"
  [[ -x .venv/bin/python ]] || hack/install.sh
  # Not local: the EXIT trap runs after this function has returned.
  work=$(mktemp -d /tmp/dra-cpu-bench.XXXXXX)  # short: the kubelet sockets below must fit 107 bytes
  port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  name="dra-cpu-bench-$$"
  trap 'podman rm -f -t 0 "$name" >/dev/null 2>&1; rm -rf "$work"' EXIT
  local start
  start=$(date +%s.%N)
  podman run -d --name "$name" --network host --user 0 --read-only --cap-drop all -v "$work:$work" "$IMAGE" \
    run --standalone "$work/cluster" --enforcement none --node-name bench --kubelet-root-dir "$work/kubelet" \
    --cdi-root "$work/cdi" --state-dir "$work/state" --metrics-address "127.0.0.1:$port" >/dev/null
  .venv/bin/python - "$start" "$work/kubelet/plugins_registry/dra.cpu-reg.sock" "$port" <<'PY'
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from dra_cpu.kubelet.client import KubeletClient

start, socket, port = float(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
deadline = start + 30
while not socket.exists():
    if time.time() > deadline:
        sys.exit(f"no registration socket {socket} after 30 s")
    time.sleep(0.01)
socket_at = time.time() - start
KubeletClient.register(socket, timeout=5).close()
while True:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as reply:
            if reply.status == 200:
                break
    except (urllib.error.URLError, ConnectionError):
        pass
    if time.time() > deadline:
        sys.exit("/readyz did not answer 200 within 30 s")
    time.sleep(0.01)
print(f"start to registration socket: {socket_at:.2f} s")
print(f"start to ready: {time.time() - start:.2f} s (podman run to /readyz 200, the bench registering as kubelet)")
PY
}

case "${1:-}" in
  build) build ;;
  "") bench ;;
  *) echo "usage: $0 [build]" >&2; exit 2 ;;
esac
