#!/usr/bin/env bash
# containerd with CRI, CDI and NRI, private to one test run.
#   containerd.sh install            containerd 2.1.x (Debian sid) and 1.7.x (trixie) unpacked into $TESTENV_CACHE,
#                                    runc, CNI plugins (Debian containernetworking-plugins), the busybox image
#   containerd.sh versions           the versions the tests run against, one a line
#   containerd.sh start VERSION DIR  run one with all its state under DIR (socket DIR/containerd.sock, NRI DIR/nri/nri.sock,
#                                    or none with NRI=off in the environment;
#                                    CDI specs from DIR/cdi, pods under the cgroup parent named in DIR/cgroup-parent)
#   containerd.sh stop VERSION DIR   stop it and remove every container, mount and cgroup it left
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/testenv/images/busybox.sh
source "$here/images/busybox.sh"

# suite:version. Bookworm's own containerd (1.6) has neither NRI nor CDI. Sid moves: when the version wanted is gone,
# install says so and takes the suite's current one, and `versions` names what is really there.
WANTED=(sid:2.1.9 trixie:1.7.24)
APT_DIR="$TESTENV_CACHE/apt-containerd"
# apt with its own sources, lists and cache: the system's apt state is neither read nor changed.
APT_OPTIONS=(-o Dir::Etc::SourceList="$APT_DIR/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o Dir::State::Lists="$APT_DIR/lists" -o Dir::Cache="$APT_DIR/cache")

die() { echo "containerd.sh: $*" >&2; exit 1; }

dir_of() { echo "$TESTENV_CACHE/containerd-$1"; }

installed_version() {  # installed_version WANTED: the version unpacked in place of WANTED, if any
  local d
  for d in "$TESTENV_CACHE"/containerd-*/; do
    d=${d%/}
    [[ -x "$d/usr/bin/containerd" && ("$d" == "$(dir_of "$1")" || "$(cat "$d/.wanted" 2>/dev/null)" == "$1") ]] &&
      { echo "${d##*/containerd-}"; return 0; }
  done
  return 1
}

fetch() {  # fetch SUITE VERSION: unpack the containerd .deb of that upstream version (or the suite's newest)
  local suite=$1 want=$2 debver rest
  # The Debian revision of the version wanted, else the suite's newest (madison lists newest first).
  local line candidates=()
  while IFS='|' read -r _ line rest; do
    [[ "$rest" == *" $suite/"* ]] && candidates+=("${line// /}")
  done < <(apt-cache "${APT_OPTIONS[@]}" madison containerd)
  for debver in "${candidates[@]}" ""; do [[ "${debver%%[~+-]*}" == "$want" ]] && break; done
  [[ -n "$debver" ]] || debver=${candidates[0]:-}
  [[ -n "$debver" ]] || die "Debian $suite has no containerd"
  local upstream=${debver%%[~+-]*}
  [[ "$upstream" == "$want" ]] || echo "containerd.sh: $suite no longer has containerd $want; using $upstream" >&2
  local work="$APT_DIR/work-$suite"
  rm -rf "$work" && mkdir -p "$work"
  (cd "$work" && apt-get -q "${APT_OPTIONS[@]}" -o APT::Sandbox::User=root download "containerd=$debver" >/dev/null)
  local dest
  dest=$(dir_of "$upstream")
  rm -rf "$dest.tmp" && dpkg -x "$work"/containerd_*.deb "$dest.tmp"
  "$dest.tmp/usr/bin/containerd" --version >&2
  echo "$want" >"$dest.tmp/.wanted"
  rm -rf "$dest" && mv "$dest.tmp" "$dest" && rm -rf "$work"
}

install() {
  # CNI plugins (a bridge) for the real-node tests' kubelet; iproute2 to remove the bridge afterwards.
  apt_install_missing runc containernetworking-plugins iproute2
  busybox_image localhost/busybox:latest >/dev/null
  local missing=() w
  for w in "${WANTED[@]}"; do installed_version "${w#*:}" >/dev/null || missing+=("$w"); done
  ((${#missing[@]})) || return 0
  mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
  local suite
  for suite in "${WANTED[@]%%:*}"; do
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main"
  done >"$APT_DIR/sources.list"
  apt-get -q "${APT_OPTIONS[@]}" -o Debug::NoLocking=1 update >/dev/null
  for w in "${missing[@]}"; do fetch "${w%%:*}" "${w#*:}"; done
}

versions() {
  local w
  for w in "${WANTED[@]}"; do installed_version "${w#*:}" || echo "${w#*:}"; done
}

write_config() {  # write_config VERSION DIR
  local version=$1 dir=$2
  # What both config schemas share, in the same words.
  local common
  common=$(cat <<TOML
root = '$dir/root'
state = '$dir/state'
[grpc]
  address = '$dir/containerd.sock'
[ttrpc]
  address = '$dir/containerd.sock.ttrpc'
[plugins.'io.containerd.internal.v1.opt']
  path = '$dir/opt'
[plugins.'io.containerd.nri.v1.nri']
  disable = $([[ "${NRI:-on}" == off ]] && echo true || echo false)
  socket_path = '$dir/nri/nri.sock'
  plugin_path = '$dir/nri/plugins'
  plugin_config_path = '$dir/nri/conf'
  plugin_registration_timeout = '5s'
  plugin_request_timeout = '2s'
TOML
)
  # CAP_SYS_RESOURCE is missing on the test machines (no negative oom_score_adj), and the hybrid cgroup layout
  # puts hugetlb alone on cgroup2, where runc cannot use it. Where cgroup2 alone is on /sys/fs/cgroup and offers
  # hugetlb (the test guest of guest.sh, production nodes) the controller stays on: with it disabled, containerd
  # also drops the hugepage limits that NRI plugins set.
  local disable_hugetlb=true
  if [[ "$(stat -f -c %T /sys/fs/cgroup)" == cgroup2fs ]] && grep -qw hugetlb /sys/fs/cgroup/cgroup.controllers; then
    disable_hugetlb=false
  fi
  local cri_common
  cri_common=$(cat <<TOML
  enable_cdi = true
  cdi_spec_dirs = ['$dir/cdi']
  restrict_oom_score_adj = true
  tolerate_missing_hugetlb_controller = true
  disable_hugetlb_controller = ${DRA_CPU_DISABLE_HUGETLB:-$disable_hugetlb}
TOML
)
  local runc_options="runtime_type = 'io.containerd.runc.v2'
        [RUNC.options]
          BinaryName = '/usr/sbin/runc'
          SystemdCgroup = false"
  if [[ "$version" == 1.* ]]; then
    local cri="plugins.'io.containerd.grpc.v1.cri'"
    cat <<TOML
version = 2
$common
[$cri]
  sandbox_image = 'localhost/pause:latest'
  disable_tcp_service = true
$cri_common
  [$cri.cni]
    bin_dir = '/usr/lib/cni'
    conf_dir = '$dir/cni'
  [$cri.containerd]
    default_runtime_name = 'runc'
      [$cri.containerd.runtimes.runc]
        ${runc_options//RUNC/$cri.containerd.runtimes.runc}
TOML
  else
    local cri="plugins.'io.containerd.cri.v1.runtime'"
    cat <<TOML
version = 3
$common
[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = 'localhost/pause:latest'
[$cri]
$cri_common
  [$cri.cni]
    bin_dirs = ['/usr/lib/cni']
    conf_dir = '$dir/cni'
  [$cri.containerd]
    default_runtime_name = 'runc'
      [$cri.containerd.runtimes.runc]
        ${runc_options//RUNC/$cri.containerd.runtimes.runc}
TOML
  fi
}

start() {  # start VERSION DIR
  local version=$1 dir
  mkdir -p "$2" && dir=$(cd "$2" && pwd)
  local bin
  bin="$(dir_of "$version")/usr/bin"
  [[ -x "$bin/containerd" ]] || die "containerd $version is not installed: run $0 install"
  mkdir -p "$dir/cdi" "$dir/cni" "$dir/nri/plugins" "$dir/nri/conf"
  write_config "$version" "$dir" >"$dir/config.toml"
  # The CRI client picks the cgroup parent and containerd cannot move it: one parent per run keeps runs apart.
  echo "/kubepods-dra-cpu-$(echo "$dir" | sha256sum | cut -c1-12)" >"$dir/cgroup-parent"
  # The shims containerd spawns are found on PATH: the system's (1.6) would be found first otherwise.
  PATH="$bin:$PATH" setsid "$bin/containerd" --config "$dir/config.toml" --log-level info \
    </dev/null >"$dir/containerd.log" 2>&1 &
  echo $! >"$dir/containerd.pid"
  local i
  for ((i = 0; i < 200; i++)); do
    [[ -S "$dir/containerd.sock" ]] && "$bin/ctr" -a "$dir/containerd.sock" version >/dev/null 2>&1 && break
    kill -0 "$(cat "$dir/containerd.pid")" 2>/dev/null || { tail -20 "$dir/containerd.log" >&2; exit 1; }
    sleep 0.05
  done
  [[ -S "$dir/containerd.sock" ]] || die "containerd $version did not start: see $dir/containerd.log"
  local ctr=("$bin/ctr" -a "$dir/containerd.sock" -n k8s.io)
  "${ctr[@]}" images import "$(busybox_image localhost/busybox:latest)" >/dev/null
  "${ctr[@]}" images tag --force localhost/busybox:latest localhost/pause:latest >/dev/null
}

# cgroup_dirs PARENT: every cgroup directory of PARENT in every hierarchy, deepest first.
cgroup_dirs() {
  local root
  for root in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
    [[ -d "$root${1#/}" ]] && find "$root${1#/}" -depth -type d
  done
  return 0
}

stop() {  # stop VERSION DIR
  local version=$1 dir
  [[ -d "$2" ]] || return 0
  dir=$(cd "$2" && pwd)
  local pid i
  if [[ -f "$dir/containerd.pid" ]] && pid=$(cat "$dir/containerd.pid") && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  # Containers and their shims outlive containerd: delete the containers by their bundles, then kill the shims
  # (found by the socket they report to, which is this run's alone).
  local bundle proc
  for bundle in "$dir"/state/io.containerd.runtime.v2.task/*/*/; do
    [[ -d "$bundle" ]] || continue
    /usr/sbin/runc --root "/run/containerd/runc/$(basename "$(dirname "$bundle")")" delete --force \
      "$(basename "$bundle")" >/dev/null 2>&1 || true
  done
  for proc in /proc/[0-9]*; do
    [[ "$(readlink "$proc/exe" 2>/dev/null)" == */containerd-shim-runc-v2 ]] || continue
    if tr '\0' '\n' <"$proc/cmdline" 2>/dev/null | grep -qxF "$dir/containerd.sock"; then
      kill -KILL "${proc#/proc/}" 2>/dev/null || true
    fi
  done
  # Rootfs, shm and sandbox mounts, deepest first.
  awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  if [[ -f "$dir/cgroup-parent" ]]; then
    local cg
    cgroup_dirs "$(cat "$dir/cgroup-parent")" | while read -r cg; do
      # A cgroup empties a moment after its last task is killed.
      for ((i = 0; i < 40; i++)); do rmdir "$cg" 2>/dev/null && break; sleep 0.05; done
    done
  fi
  rm -rf --one-file-system "$dir"
}

case "${1:-}" in
  install) install ;;
  versions) versions ;;
  start) start "${2:?VERSION}" "${3:?DIR}" ;;
  stop) stop "${2:?VERSION}" "${3:?DIR}" ;;
  *) echo "usage: $0 install | versions | start VERSION DIR | stop VERSION DIR" >&2; exit 2 ;;
esac
