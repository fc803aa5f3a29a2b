#!/usr/bin/env bash
# The base image for building the Dockerfile here: no registry is reachable from the test machines, so
# python:3.11-slim-bookworm cannot be pulled. A minimal Debian bookworm with python3 (debootstrap --variant=minbase)
# stands in for it.
#   image-base.sh install   builds the rootfs tarball once (cached under $TESTENV_CACHE/images) and imports it into
#                           podman as localhost/dra-cpu-base:bookworm when podman lacks it
#   image-base.sh name      prints the image name
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/testenv/images/busybox.sh
source "$here/images/busybox.sh"

IMAGE=localhost/dra-cpu-base:bookworm
SUITE=bookworm
# python3-venv: the Dockerfile's build stage makes a venv with pip, as the slim python image can.
PACKAGES=python3,python3-venv
# Bump when the recipe changes, so a cached tarball made by an older recipe is rebuilt.
RECIPE=1
TARBALL="$TESTENV_CACHE/images/dra-cpu-base-$SUITE-r$RECIPE.tar"
CONF="$TESTENV_CACHE/podman/containers.conf"

log() { echo "image-base: $*" >&2; }

build_tarball() {
  [[ -s "$TARBALL" ]] && return
  apt_install_missing debootstrap
  local root
  root=$(mktemp -d "$TESTENV_CACHE/images/rootfs.XXXXXX")
  trap 'rm -rf "$root"' RETURN
  log "debootstrap $SUITE with $PACKAGES (a few minutes, once)"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" http://deb.debian.org/debian >/dev/null ||
    { log "error: debootstrap failed"; return 1; }
  # What an image never needs: package caches and lists, documentation, locales.
  rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/{doc,man,info,locale}/* \
    "$root"/var/log/* "$root"/tmp/*
  tar --numeric-owner -C "$root" -cf "$TARBALL.tmp" .
  mv -f "$TARBALL.tmp" "$TARBALL"
  log "built $TARBALL ($(du -h "$TARBALL" | cut -f1))"
}

import_image() {
  # podman and its containers.conf come from podman.sh, which install-testenv.sh would run only after this script.
  bash "$here/podman.sh" install
  local want have
  want=$(sha256sum "$TARBALL" | cut -c1-64)
  have=$(CONTAINERS_CONF="$CONF" podman image inspect --format '{{index .Labels "tarball-sha256"}}' "$IMAGE" 2>/dev/null || true)
  [[ "$have" == "$want" ]] && return
  CONTAINERS_CONF="$CONF" podman import -q --change "LABEL tarball-sha256=$want" --change 'CMD ["python3"]' \
    "$TARBALL" "$IMAGE" >/dev/null
  log "imported $IMAGE"
}

case "${1:-}" in
  install) build_tarball && import_image ;;
  name) echo "$IMAGE" ;;
  *) echo "usage: $0 install|name" >&2; exit 2 ;;
esac
