#!/usr/bin/env bash
# podman + runc: a CDI consumer without NRI.
#   podman.sh install   podman, runc, busybox-static from the system's apt; $TESTENV_CACHE/podman/containers.conf;
#                       the busybox image as localhost/bb:latest
# Run podman with CONTAINERS_CONF=$TESTENV_CACHE/podman/containers.conf. It reads CDI specs only from /etc/cdi and
# /var/run/cdi (4.3 has no setting for other directories).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/testenv/images/busybox.sh
source "$here/images/busybox.sh"

IMAGE=localhost/bb:latest
CONF="$TESTENV_CACHE/podman/containers.conf"

install() {
  apt_install_missing podman runc busybox-static
  mkdir -p "${CONF%/*}"
  # Root lacks CAP_SYS_RESOURCE on the test machines, so podman's default rlimits (raised nofile) cannot be set;
  # crun refuses the hybrid cgroup layout there, runc does not.
  cat >"$CONF" <<'TOML'
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]

[engine]
runtime = "runc"
TOML
  local archive
  archive=$(busybox_image "$IMAGE")
  local want have
  # The index names one manifest; podman reports that digest for the image it loaded from it.
  want=$(tar -xOf "$archive" index.json | grep -o '"digest":"sha256:[0-9a-f]*"' | cut -d'"' -f4)
  have=$(CONTAINERS_CONF="$CONF" podman image inspect --format '{{.Digest}}' "$IMAGE" 2>/dev/null || true)
  if [[ "$have" != "$want" ]]; then
    CONTAINERS_CONF="$CONF" podman load -q -i "$archive" >/dev/null
    CONTAINERS_CONF="$CONF" podman image inspect --format '{{.Digest}}' "$IMAGE" >/dev/null
  fi
}

case "${1:-}" in
  install) install ;;
  *) echo "usage: $0 install" >&2; exit 2 ;;
esac
