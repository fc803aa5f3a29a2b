#!/usr/bin/env bash
# The test image shared by every container runtime: Debian's busybox-static as a one-layer OCI archive.
#   busybox.sh NAME   builds (or refreshes) the OCI archive of image NAME under $TESTENV_CACHE/images; prints its path
# Sourced, it only defines the helpers that the runtime scripts share.
set -euo pipefail

TESTENV_CACHE=/var/cache/dra-cpu-testenv

# apt_install_missing PKG...: installs from the system's apt sources whatever of PKG is not installed yet.
apt_install_missing() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  echo "testenv: apt-get install ${missing[*]}" >&2
  # Other installers may hold the dpkg lock for a while; wait rather than fail.
  local apt=(apt-get -qq -o DPkg::Lock::Timeout=600)
  # A fresh machine may have no package lists yet, or stale ones that point at removed versions.
  DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    "${apt[@]}" update
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null
  }
}

# busybox_image NAME: prints the path of the OCI archive of the busybox image named NAME, building it if needed.
busybox_image() {
  local name=$1 here
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  apt_install_missing busybox-static
  mkdir -p "$TESTENV_CACHE/images"
  local out="$TESTENV_CACHE/images/${name//[^A-Za-z0-9._-]/_}.oci.tar"
  # The build is deterministic and takes a fraction of a second: redo it when the binary or the builder is newer.
  if [[ ! -s "$out" || /bin/busybox -nt "$out" || "$here/busybox-oci.py" -nt "$out" ]]; then
    python3 "$here/busybox-oci.py" /bin/busybox "$name" "$out"
  fi
  echo "$out"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  busybox_image "${1:?usage: busybox.sh IMAGE_NAME}"
fi
