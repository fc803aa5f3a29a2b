#!/usr/bin/env bash
# A multi-NUMA test node that a real kernel enforces: Debian's own kernel and a Debian rootfs, booted by qemu
# (tests/harness/guest/vm.py picks the topology: sockets, SMT, NUMA nodes and distances, hugepages, isolcpus).
#   guest.sh install     builds, once, under $TESTENV_CACHE/guest/<key>/: vmlinuz (bookworm linux-image-amd64),
#                        initrd.img (busybox; the virtio, 9p, ext4 and overlay modules; the NIC's, the bridge's and
#                        veth's for a node with a pod network) and rootfs.ext4 (debootstrap minbase with python3,
#                        runc, the CNI plugins, util-linux, procps, numactl, busybox; the containerd versions of
#                        containerd.sh and its busybox image). The key covers this script, the kernel package and the
#                        containerd versions, so that checkouts with different scripts each find their own build.
#   guest.sh installed   exit 0 and print the build directory when `install` is done for this script and the
#                        containerd versions of containerd.sh, else exit 1
# A cold build takes about 70 s here (debootstrap about 50 s of it) once qemu and containerd are installed; a warm
# install only checks (0.2 s).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/testenv/images/busybox.sh
source "$here/images/busybox.sh"

SUITE=bookworm
# python3: the driver and the test harness; runc: containerd's runtime; containernetworking-plugins: the pod network
# of a guest joined as a node (bridge, host-local, loopback); busybox-static: the initramfs and containerd.sh's
# busybox image; numactl: numastat and placement checks by hand.
PACKAGES=python3,runc,containernetworking-plugins,util-linux,procps,numactl,kmod,busybox-static
# Built as modules in Debian's kernel; loaded by the initramfs before the root is mounted. virtio_net, bridge and
# veth are for a guest with a NIC and a pod network; loaded without one, they cost nothing.
MODULES=(virtio_pci virtio_blk virtio_console ext4 9p 9pnet_virtio overlay virtio_net bridge veth)
# Room for containerd's images (the driver's among them) and snapshots: the image is sparse, and each boot writes to
# a throwaway overlay.
ROOTFS_SIZE=4G
CACHE="$TESTENV_CACHE/guest"
KEEP_BUILDS=3
SCRIPT_SHA=$(cat "$0" "$here/guest/"* | sha256sum | cut -c1-16)

log() { echo "guest.sh: $*" >&2; }
die() { echo "guest.sh: error: $*" >&2; exit 1; }

# build_of: the build directory of this script (and the containerd versions of containerd.sh), if there is one.
build_of() {
  local sha=$1 versions build
  versions="containerd $(bash "$here/containerd.sh" versions | tr '\n' ' ')"
  for build in "$CACHE"/*/; do
    build=${build%/}
    [[ -f "$build/script.sha" && "$(cat "$build/script.sha")" == "$sha" ]] || continue
    # A containerd that containerd.sh gained since (a new build, a newer Debian one) is not in the image yet.
    grep -qxF "$versions" "$build/info" || continue
    echo "$build"
    return 0
  done
  return 1
}

installed() {
  local build f
  build=$(build_of "$SCRIPT_SHA") || return 1
  for f in vmlinuz initrd.img rootfs.ext4 info; do [[ -s "$build/$f" ]] || return 1; done
  command -v qemu-system-x86_64 >/dev/null || return 1
  echo "$build"
}

# kernel_package: "name version" of the kernel that bookworm's linux-image-amd64 depends on.
kernel_package() {
  local name
  name=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  if [[ -z "$name" ]]; then
    apt-get -qq -o DPkg::Lock::Timeout=600 update >/dev/null || die "apt-get update failed"
    name=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  fi
  [[ -n "$name" ]] || die "apt knows no linux-image-amd64 (is deb.debian.org $SUITE in the sources?)"
  echo "$name $(apt-cache show --no-all-versions "$name" | awk '/^Version:/ { print $2; exit }')"
}

# kernel_deb NAME VERSION: the kernel package, downloaded once into $CACHE/debs.
kernel_deb() {
  local name=$1 version=$2 deb
  mkdir -p "$CACHE/debs"
  deb=$(ls "$CACHE/debs/${name}_${version//:/%3a}_"*.deb 2>/dev/null | head -1)
  if [[ -z "$deb" ]]; then
    log "downloading $name $version"
    (cd "$CACHE/debs" && apt-get -q -o APT::Sandbox::User=root download "$name=$version" >/dev/null) ||
      die "apt-get download $name=$version failed"
    deb=$(ls "$CACHE/debs/${name}_${version//:/%3a}_"*.deb | head -1)
  fi
  echo "$deb"
}

# unpack_kernel DEB DIR: vmlinuz, release and the modules with modules.dep into DIR (modprobe -d DIR/root).
unpack_kernel() {
  local deb=$1 dir=$2 release
  dpkg -x "$deb" "$dir/root" || die "dpkg -x of $deb failed"
  release=$(basename "$dir"/root/lib/modules/*)
  depmod -b "$dir/root" "$release" || die "depmod for $release failed"
  cp "$dir/root/boot/vmlinuz-$release" "$dir/vmlinuz"
  echo "$release" >"$dir/release"
}

# tarball_of "SUITE PACKAGES": the name of their debootstrap tarball (a build's info says which it was made from).
tarball_of() {
  local suite=${1%% *} packages=${1#* }
  echo "debootstrap-$suite-$(echo "$packages" | sha256sum | cut -c1-12).tar"
}

# rootfs_tarball: debootstrap of SUITE with PACKAGES, once (a few minutes).
rootfs_tarball() {
  local tarball
  tarball="$CACHE/$(tarball_of "$SUITE $PACKAGES")"
  if [[ ! -s "$tarball" ]]; then
    local root
    root=$(mktemp -d "$CACHE/debootstrap.XXXXXX")
    log "debootstrap $SUITE with $PACKAGES (about a minute, once)"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" http://deb.debian.org/debian \
      >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; rm -rf "$root"; die "debootstrap failed (log: $root.log)"; }
    rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/{doc,man,info,locale}/* \
      "$root"/var/log/* "$root"/tmp/*
    tar --numeric-owner -C "$root" -cf "$tarball.tmp" . && mv -f "$tarball.tmp" "$tarball"
    rm -rf "$root" "$root.log"
  fi
  echo "$tarball"
}

# initramfs KERNEL_DIR OUT: busybox, the modules in load order, and guest/initramfs-init as /init.
initramfs() {
  local kernel=$1 out=$2 work release
  release=$(cat "$kernel/release")
  work=$(mktemp -d "$CACHE/initramfs.XXXXXX")
  mkdir -p "$work"/{bin,dev,proc,sys,newroot,modules}
  cp /bin/busybox "$work/bin/busybox"
  # modprobe --show-depends lists each module after what it needs; keep the first mention of each.
  local m verb path seen=" "
  : >"$work/modules/order"
  local deps
  for m in "${MODULES[@]}"; do
    deps=$(modprobe -d "$kernel/root" -S "$release" --show-depends "$m") || die "module $m is not in kernel $release"
    while read -r verb path _; do
      [[ "$verb" == insmod && "$seen" != *" $path "* ]] || continue
      seen+="$path "
      cp "$path" "$work/modules/"
      basename "$path" >>"$work/modules/order"
    done <<<"$deps"
  done
  install -m 0755 "$here/guest/initramfs-init" "$work/init"
  (cd "$work" && find . | cpio -o -H newc --quiet | gzip -1) >"$out" || die "packing the initramfs failed"
  rm -rf "$work"
}

# rootfs TARBALL OUT: the debootstrap tree plus containerd, the busybox image and the guest's init, as ext4.
rootfs() {
  local tarball=$1 out=$2 root
  root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  tar -C "$root" -xf "$tarball"
  # containerd.sh runs unchanged inside: it finds its binaries and the image under $TESTENV_CACHE there too.
  local version dir
  mkdir -p "$root$TESTENV_CACHE/images"
  for version in $(bash "$here/containerd.sh" versions); do
    dir="$TESTENV_CACHE/containerd-$version"
    [[ -x "$dir/usr/bin/containerd" ]] || die "containerd $version is not installed: run hack/testenv/containerd.sh install"
    mkdir -p "$root$dir/usr"
    cp -a "$dir/usr/bin" "$root$dir/usr/"
    [[ -f "$dir/.wanted" ]] && cp "$dir/.wanted" "$root$dir/"
  done
  cp -p "$(busybox_image localhost/busybox:latest)" "$root$TESTENV_CACHE/images/"
  install -m 0755 "$here/guest/init" "$root/sbin/dra-guest-init"
  echo "dra-guest" >"$root/etc/hostname"
  # Pods with the host network get copies of these; a guest with a NIC adds the API server's name at boot.
  printf '127.0.0.1 localhost\n127.0.1.1 dra-guest\n::1 localhost\n' >"$root/etc/hosts"
  : >"$root/etc/resolv.conf"
  echo "::respawn:/sbin/dra-guest-init agent" >"$root/etc/inittab"
  rm -f "$out"
  mkfs.ext4 -q -F -L dra-guest -E root_owner=0:0 -d "$root" "$out" "$ROOTFS_SIZE" >/dev/null || die "mkfs.ext4 -d failed"
  rm -rf "$root"
}

install_guest() {
  apt_install_missing qemu-system-x86 debootstrap busybox-static cpio kmod e2fsprogs
  bash "$here/containerd.sh" install
  installed >/dev/null && return 0
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock 9
  local start=$SECONDS kernel_name kernel_version deb kernel release tarball key build
  read -r kernel_name kernel_version < <(kernel_package)
  deb=$(kernel_deb "$kernel_name" "$kernel_version")
  tarball=$(rootfs_tarball)
  key=$(printf '%s\n' "$SCRIPT_SHA" "$kernel_name $kernel_version" "$(basename "$tarball")" \
    "$(bash "$here/containerd.sh" versions)" | sha256sum | cut -c1-16)
  build="$CACHE/$key"
  if [[ ! -s "$build/rootfs.ext4" ]]; then
    rm -rf "$build.tmp" && mkdir -p "$build.tmp/kernel"
    kernel="$build.tmp/kernel"
    unpack_kernel "$deb" "$kernel"
    release=$(cat "$kernel/release")
    log "initramfs with ${MODULES[*]} (and what they need)"
    initramfs "$kernel" "$build.tmp/initrd.img"
    cp "$kernel/vmlinuz" "$build.tmp/vmlinuz"
    rm -rf "$kernel"
    log "rootfs image"
    rootfs "$tarball" "$build.tmp/rootfs.ext4"
    {
      echo "kernel $kernel_name $kernel_version ($release)"
      echo "rootfs $SUITE $PACKAGES"
      echo "containerd $(bash "$here/containerd.sh" versions | tr '\n' ' ')"
      echo "python $(tar -xOf "$tarball" ./var/lib/dpkg/status | awk '/^Package: python3.[0-9]+-minimal$/ { p = 1 } p && /^Version:/ { print $2; exit }')"
      echo "built in $((SECONDS - start)) s on $(date -u +%FT%TZ)"
    } >"$build.tmp/info"
    echo "$SCRIPT_SHA" >"$build.tmp/script.sha"
    rm -rf "$build" && mv "$build.tmp" "$build"
  fi
  touch "$build"
  # The newest KEEP_BUILDS builds stay (other checkouts, with another version of this script, use theirs); older ones
  # go: each holds a sparse image of ROOTFS_SIZE. So do the kernel packages and debootstrap tarballs none of them uses.
  local old kept=() keep_debs=() keep_tarballs=()
  for old in $(ls -1dt "$CACHE"/*/ 2>/dev/null); do
    old=${old%/}
    # A `current` link (what guest.sh named its build before) is another checkout's, and not a build itself.
    [[ -f "$old/script.sha" && ! -L "$old" ]] || continue
    if ((${#kept[@]} < KEEP_BUILDS)); then
      kept+=("$old")
      keep_debs+=("$(awk '$1 == "kernel" { print $2 "_" $3; exit }' "$old/info" | sed 's/:/%3a/')")
      keep_tarballs+=("$(tarball_of "$(awk '$1 == "rootfs" { print $2, $3; exit }' "$old/info")")")
    else
      rm -rf "$old"
    fi
  done
  local file name
  for file in "$CACHE"/debs/*.deb "$CACHE"/debootstrap-*.tar; do
    [[ -e "$file" ]] || continue
    name=$(basename "$file")
    [[ " ${keep_debs[*]/%/_amd64.deb} ${keep_tarballs[*]} " == *" $name "* ]] || rm -f "$file"
  done
  installed >/dev/null || die "the build in $build is incomplete"
  log "built $build in $((SECONDS - start)) s: $(tr '\n' ';' <"$build/info")"
}

case "${1:-}" in
  install) install_guest ;;
  installed) installed ;;
  *) echo "usage: $0 install | installed" >&2; exit 2 ;;
esac
