#!/usr/bin/env bash
# containerd with CRI, CDI and NRI, private to one test run.
#   containerd.sh install            containerd 2.1.x (Debian sid) and 1.7.x (trixie) unpacked into $TESTENV_CACHE,
#                                    containerd $BUILT with its own runc built from the Go module proxy (see build),
#                                    runc, CNI plugins (Debian containernetworking-plugins), the busybox image
#   containerd.sh build              only the build from source (a no-op once built)
#   containerd.sh versions           the versions the tests run against, one a line (the built one last)
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
# Debian has no containerd whose NRI applies a memory policy (NRI 0.12: containerd 2.3 and later) nor a runc that
# sets OCI linux.memoryPolicy (runc 1.4 and later), so one release is built from the Go module proxy, with the runc
# that release is tested with (its script/setup/runc-version), into $TESTENV_CACHE/containerd-$BUILT/usr/bin.
BUILT=2.4.2
# Measured on the 2-core test machine, Go 1.26.8: a cold build (empty module and build caches: 590 MB of modules
# fetched, about 1,000 packages compiled, 600 MB of build cache) took 74 s (containerd 65 s, runc 9 s), and 131 s
# while other tests loaded the machine; with kubernetes.sh's caches warm 79 s under load; a warm `build` or
# `install` (binaries there) under 0.05 s. The four binaries take 84 MB.
# Bump when the build recipe changes so that binaries built by an older recipe are rebuilt.
BUILD_RECIPE=1
# Only what the tests start: the daemon, its runc shim and ctr (which start imports the image with).
BUILT_COMMANDS=(containerd containerd-shim-runc-v2 ctr)
# Snapshotters that need cgo or are never used here, and the tracing plugin: fewer packages to compile.
BUILD_TAGS="no_btrfs no_devmapper no_zfs no_tracing urfave_cli_no_docs"
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

built() {  # built VERSION: exit 0 when the build of VERSION by this recipe is in place
  local dest c
  dest=$(dir_of "$1")
  [[ "$(cat "$dest/.recipe" 2>/dev/null)" == "$BUILD_RECIPE" && -x "$dest/usr/bin/runc" ]] || return 1
  for c in "${BUILT_COMMANDS[@]}"; do [[ -x "$dest/usr/bin/$c" ]] || return 1; done
}

# go_install LOG LABEL ARGS...: `go install ARGS` with its output in LOG, saying every 30 s how far it is.
go_install() {
  local log=$1 label=$2 start=$SECONDS before
  shift 2
  before=$(grep -vc '^go: ' "$log" || true)
  go install -v "$@" >>"$log" 2>&1 &
  local pid=$! last=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    ((SECONDS - last >= 30)) || continue
    last=$SECONDS
    # go install -v names each package as it compiles it; "go: downloading" lines are module fetches.
    echo "containerd.sh: $label: $(($(grep -vc '^go: ' "$log" || true) - before)) packages compiled, $((SECONDS - start)) s" >&2
  done
  wait "$pid" || { tail -30 "$log" >&2; die "building $label failed (log: $log)"; }
}

build() {  # build VERSION: containerd VERSION and its runc from the Go module proxy
  local version=$1 dest
  dest=$(dir_of "$version")
  built "$version" && return 0
  mkdir -p "$TESTENV_CACHE"
  # Other sessions share the cache: one build at a time, and the second finds the first's result.
  exec 8>"$TESTENV_CACHE/.containerd-build.lock"
  flock 8
  built "$version" && return 0
  # runc's nsenter is C (cgo), and seccomp is libseccomp's.
  apt_install_missing gcc libc6-dev pkg-config libseccomp-dev
  local go
  go=$(bash "$here/kubernetes.sh" go) || die "no go command, and none could be fetched"
  # The module and build caches are kubernetes.sh's: packages both build (grpc, protobuf, ...) are compiled once.
  PATH="$(dirname "$go"):$PATH"
  export PATH GOPATH="$TESTENV_CACHE/go" GOMODCACHE="$TESTENV_CACHE/go/mod" GOCACHE="$TESTENV_CACHE/go/build"
  export GOFLAGS='' GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
  local start=$SECONDS log="$dest.build.log" module=github.com/containerd/containerd/v2
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp/usr/bin" && : >"$log"
  echo "containerd.sh: building containerd $version and its runc with $(go version | cut -d' ' -f3) (log: $log)" >&2
  local source runc
  source=$(go mod download -json "$module@v$version" | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])') ||
    die "cannot download $module@v$version from the Go module proxy ($(go env GOPROXY))"
  runc=$(cat "$source/script/setup/runc-version") || die "$module@v$version names no runc version"
  local pkgs=() c
  for c in "${BUILT_COMMANDS[@]}"; do pkgs+=("$module/cmd/$c@v$version"); done
  # Static and without cgo, as containerd's release builds its shim; -trimpath as kubernetes.sh builds.
  CGO_ENABLED=0 GOBIN="$dest.tmp/usr/bin" go_install "$log" "containerd $version" -trimpath -tags "$BUILD_TAGS" \
    -ldflags "-s -w -X $module/version.Version=$version" "${pkgs[@]}"
  echo "containerd.sh: containerd $version built after $((SECONDS - start)) s; building runc $runc" >&2
  CGO_ENABLED=1 GOBIN="$dest.tmp/usr/bin" go_install "$log" "runc $runc" -trimpath -tags "seccomp urfave_cli_no_docs" \
    -ldflags "-s -w" "github.com/opencontainers/runc@$runc"
  "$dest.tmp/usr/bin/containerd" --version >&2 && "$dest.tmp/usr/bin/runc" --version >&2
  echo "$BUILD_RECIPE" >"$dest.tmp/.recipe"
  rm -rf "$dest" && mv "$dest.tmp" "$dest" && mv "$log" "$dest/build.log"
  echo "containerd.sh: built containerd $version and runc $runc in $((SECONDS - start)) s into $dest" >&2
}

install() {
  # CNI plugins (a bridge) for the real-node tests' kubelet; iproute2 to remove the bridge afterwards.
  apt_install_missing runc containernetworking-plugins iproute2
  busybox_image localhost/busybox:latest >/dev/null
  build "$BUILT"
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
  echo "$BUILT"
}

runc_of() {  # runc_of VERSION: the runc that containerd VERSION runs: its own where it was built with one
  local own
  own="$(dir_of "$1")/usr/bin/runc"
  [[ -x "$own" ]] && echo "$own" || echo /usr/sbin/runc
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
  # Pods' network namespaces are mounted below DIR/state (not /var/run/netns), so that stop finds and removes those
  # of pods that were never torn down.
  # CAP_SYS_RESOURCE is missing on the test machines (no negative oom_score_adj), and the hybrid cgroup layout
  # puts hugetlb alone on cgroup2, where runc cannot use it. Where cgroup2 alone is on /sys/fs/cgroup and offers
  # hugetlb (the test guest of guest.sh, production nodes) the controller stays on: with it disabled, containerd
  # also drops the hugepage limits that NRI plugins set.
  local disable_hugetlb=true
  if [[ "$(stat -f -c %T /sys/fs/cgroup)" == cgroup2fs ]] && grep -qw hugetlb /sys/fs/cgroup/cgroup.controllers; then
    disable_hugetlb=false
  fi
  local cri_common
  # containerd 2.4 always reads CDI specs and warns about the key.
  cri_common=$(cat <<TOML
$([[ "$version" == 1.* || "$version" == 2.[0-3].* ]] && echo "  enable_cdi = true")
  cdi_spec_dirs = ['$dir/cdi']
  netns_mounts_under_state_dir = true
  restrict_oom_score_adj = true
  tolerate_missing_hugetlb_controller = true
  disable_hugetlb_controller = ${DRA_CPU_DISABLE_HUGETLB:-$disable_hugetlb}
TOML
)
  local runc runc_options
  runc=$(runc_of "$version")
  runc_options="runtime_type = 'io.containerd.runc.v2'
        [RUNC.options]
          BinaryName = '$runc'
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
  # The image hack/examples' pods name (there is no registry to pull it from).
  "${ctr[@]}" images tag --force localhost/busybox:latest docker.io/library/busybox:1.36 >/dev/null
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
    "$(runc_of "$version")" --root "/run/containerd/runc/$(basename "$(dirname "$bundle")")" delete --force \
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
  build) build "$BUILT" ;;
  versions) versions ;;
  start) start "${2:?VERSION}" "${3:?DIR}" ;;
  stop) stop "${2:?VERSION}" "${3:?DIR}" ;;
  *) echo "usage: $0 install | build | versions | start VERSION DIR | stop VERSION DIR" >&2; exit 2 ;;
esac
