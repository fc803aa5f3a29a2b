#!/usr/bin/env bash
# cgroup v2 for the cpuset and cpu controllers on a hybrid machine (v1 hierarchies plus a cgroup2 mount holding
# almost nothing), reversibly, so that containerd can be tested the way production nodes run it.
#   cgroupv2.sh check   exit 0 if `enter` can move the controllers (saying which empty leftovers it would remove),
#                       else exit 1 with every reason on stderr
#   cgroupv2.sh enter   move cpuset and cpu to cgroup2 and print a mount namespace file in which cgroup2 is on
#                       /sys/fs/cgroup: run containerd there (nsenter --mount=FILE ...). Prints nothing where the
#                       host already is pure cgroup v2 with both controllers.
#   cgroupv2.sh leave   move them back, with the v1 mount options recorded by `enter`. Idempotent; repairs a
#                       half-done enter or leave, and restores even while processes are left in the namespace
#                       (it then names them and exits 1).
# A controller serves one hierarchy at a time and leaves a v1 hierarchy only when that is unmounted everywhere and
# has no child cgroup, so `check` refuses while any child cgroup holds a process, or is not a leftover of this
# project's tests, or another mount namespace has the hierarchy mounted. The memory hierarchy is never touched:
# the machine's own processes live in it.
set -euo pipefail

# CGROUPV2_CONTROLLERS, CGROUPV2_STATE and CGROUPV2_RELEASE_SECONDS exist for the script's own test (tests/test_cgroupv2_script.py).
read -r -a MOVE <<<"${CGROUPV2_CONTROLLERS:-cpuset cpu}"
UNIFIED=/sys/fs/cgroup/unified
STATE=${CGROUPV2_STATE:-/run/dra-cpu-cgroupv2}
# Cgroups of containers that exited lately stay dying for about a minute here, holding their controller in v1.
RELEASE_SECONDS=${CGROUPV2_RELEASE_SECONDS:-90}
# Empty child cgroups that may be removed: what containerd.sh (cgroup parents), podman and the cpuset benches and
# demo leave behind when a run is killed.
REMOVABLE=('kubepods-dra-cpu-*' 'libpod_parent' 'dra-cpu-*')

die() { echo "cgroupv2.sh: $*" >&2; exit 1; }

# targets: the v1 mounts holding a controller to move, one "point|mount options|source|super options" a line.
targets() {
  awk -v want="${MOVE[*]}" '
    BEGIN { n = split(want, w, " ") }
    {
      for (i = 7; i <= NF && $i != "-"; i++) {}
      if ($(i + 1) != "cgroup") next
      split($(i + 3), opts, ",")
      for (j in opts) for (k = 1; k <= n; k++) if (opts[j] == w[k]) { print $5 "|" $6 "|" $(i + 2) "|" $(i + 3); next }
    }' /proc/self/mountinfo
}

is_pure_v2() {
  [[ "$(stat -f -c %T /sys/fs/cgroup)" == cgroup2fs ]] || return 1
  local c controllers
  controllers=" $(cat /sys/fs/cgroup/cgroup.controllers) "
  for c in "${MOVE[@]}"; do [[ "$controllers" == *" $c "* ]] || return 1; done
}

removable() {
  local pattern
  for pattern in "${REMOVABLE[@]}"; do
    # shellcheck disable=SC2053 # the patterns are globs
    [[ "$1" == $pattern ]] && return 0
  done
  return 1
}

# holder CGROUP_NAME: who made a kubepods-dra-cpu-* cgroup parent, from the state dirs containerd.sh writes.
holder() {
  local f
  for f in /tmp/*/cgroup-parent; do
    [[ -f "$f" && "$(cat "$f")" == "/$1" ]] && { echo " (the containerd of ${f%/cgroup-parent}: stop it with" \
      "hack/testenv/containerd.sh stop VERSION ${f%/cgroup-parent})"; return 0; }
  done
  return 0
}

# problems: fills REASONS with every reason the move cannot be done and REMOVE with the leftovers to remove.
REASONS=() REMOVE=()
problems() {
  REASONS=() REMOVE=()
  [[ $EUID -eq 0 ]] || { REASONS+=("needs root"); return; }
  [[ "$(stat -f -c %T "$UNIFIED" 2>/dev/null)" == cgroup2fs ]] ||
    { REASONS+=("no cgroup2 mount at $UNIFIED: not the hybrid layout this script knows"); return; }
  [[ ! -e "$STATE" ]] || { REASONS+=("already moved (state in $STATE): run $0 leave"); return; }
  local line point superopts child pids
  local -a found
  mapfile -t found < <(targets)
  ((${#found[@]})) || REASONS+=("none of ${MOVE[*]} is a v1 hierarchy, and $UNIFIED does not offer them either")
  for line in "${found[@]}"; do
    IFS='|' read -r point _ _ superopts <<<"$line"
    [[ ",$superopts," != *,memory,* ]] || { REASONS+=("$point also holds the memory controller"); continue; }
    while IFS= read -r child; do
      pids=$(find "$child" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -un | tr '\n' ' ')
      if [[ -n "$pids" ]]; then
        REASONS+=("$child holds processes ($(wc -w <<<"$pids"), e.g. pid ${pids%% *}:\
 $(tr '\0' ' ' <"/proc/${pids%% *}/cmdline" 2>/dev/null | cut -c1-120))$(holder "${child##*/}")")
      elif removable "${child##*/}"; then
        REMOVE+=("$child")
      else
        REASONS+=("$child is an empty cgroup this script did not expect: remove it if it is unused")
      fi
    done < <(find "$point" -mindepth 1 -maxdepth 1 -type d)
    mapfile -t -O "${#REASONS[@]}" REASONS < <(others_mounting "$point")
    mapfile -t -O "${#REASONS[@]}" REASONS < <(dying "$point" "$superopts")
  done
}

# dying POINT SUPEROPTS: one line if the kernel counts more cgroups in POINT's hierarchy than there are folders.
# Cgroups of processes that exited lately (podman's conmon, say) can stay dying for minutes, and the controller
# stays bound to v1 until they are gone: moving then would hang until the kernel lets go.
dying() {
  local controller have count
  controller=$(tr ',' '\n' <<<"$2" | grep -m1 -xE "$(IFS='|'; echo "${MOVE[*]}")")
  have=$(find "$1" -type d | wc -l)
  count=$(awk -v c="$controller" '$1 == c { print $3 }' /proc/cgroups)
  ((count <= have)) || echo "$1 has $((count - have)) dying cgroup(s) the kernel has not freed yet (exited containers); try again later"
}

# others_mounting POINT: one line if processes of other mount namespaces (containers) have POINT's hierarchy mounted.
others_mounting() {
  local dev ours proc ns seen=" " count=0 example=""
  dev=$(mountpoint -d "$1")
  ours=$(readlink /proc/self/ns/mnt)
  for proc in /proc/[0-9]*; do
    ns=$(readlink "$proc/ns/mnt" 2>/dev/null) || continue
    [[ "$ns" != "$ours" && "$seen" != *" $ns "* ]] || continue
    seen+="$ns "
    if awk -v dev="$dev" '$3 == dev { f = 1 } END { exit !f }' "$proc/mountinfo" 2>/dev/null; then
      ((++count))
      [[ -n "$example" ]] || example="pid ${proc#/proc/} ($(cat "$proc/comm" 2>/dev/null))"
    fi
  done
  ((count == 0)) || echo "$count other mount namespace(s) have the hierarchy of $1 mounted, e.g. that of $example"
}

moved() {  # moved DIR: a moved controller is available in the cgroup2 directory DIR
  local c controllers
  controllers=" $(cat "$1/cgroup.controllers" 2>/dev/null) "
  for c in "${MOVE[@]}"; do [[ "$controllers" != *" $c "* ]] || return 0; done
  return 1
}

check() {
  if is_pure_v2; then echo "pure cgroup v2 already: nothing to move"; return 0; fi
  problems
  ((${#REASONS[@]} == 0)) || { printf '%s\n' "${REASONS[@]}" >&2; return 1; }
  echo "can move ${MOVE[*]} to cgroup v2; would remove these empty leftovers: ${REMOVE[*]:-none}"
}

retry() {  # retry SECONDS COMMAND...: the kernel releases a controller a moment after its last cgroup goes
  local end=$((SECONDS + $1)); shift
  until "$@" 2>/dev/null; do
    ((SECONDS < end)) || { "$@"; return; }
    sleep 0.1
  done
}

write() { echo "$2" >"$1"; }

tidy() {
  is_pure_v2 && return 0
  problems
  local child dir
  for child in "${REMOVE[@]}"; do
    find "$child" -depth -type d | while read -r dir; do rmdir "$dir" 2>/dev/null || true; done
  done
}

enter() {
  if is_pure_v2; then return 0; fi
  problems
  ((${#REASONS[@]} == 0)) || die "cannot move ${MOVE[*]} to cgroup v2:$(printf '\n%s' "${REASONS[@]}")"
  # What leave needs is written before anything changes, so that leave can always repair.
  mkdir -p "$STATE.tmp"
  targets >"$STATE.tmp/mounts"
  cat "$UNIFIED/cgroup.subtree_control" >"$STATE.tmp/subtree_control"
  find "$UNIFIED" -mindepth 1 -type d >"$STATE.tmp/v2-dirs"
  mv "$STATE.tmp" "$STATE"
  # Cgroups just removed (leftovers above) can take many seconds to die and release their controller.
  # Whatever stops enter half-way (set -e included), the machine goes back.
  trap 'echo "cgroupv2.sh: enter failed; moving back" >&2; leave >&2' EXIT
  local child dir point
  for child in "${REMOVE[@]}"; do
    # A process that is leaving (podman's conmon outlives `podman run --rm` by a moment) keeps its cgroup busy.
    find "$child" -depth -type d | while read -r dir; do retry 30 rmdir "$dir" || true; done
    [[ ! -d "$child" ]] || die "cannot remove $child: processes still in it: $(cat "$child"/cgroup.procs "$child"/*/cgroup.procs 2>/dev/null | tr '\n' ' ')"
  done
  while IFS='|' read -r point _; do retry 5 umount "$point"; done <"$STATE/mounts"
  local c
  for c in "${MOVE[@]}"; do
    [[ " $(cat "$UNIFIED/cgroup.subtree_control") " == *" $c "* ]] || retry "$RELEASE_SECONDS" write "$UNIFIED/cgroup.subtree_control" "+$c" ||
      { echo "cgroupv2.sh: the kernel did not release $c from cgroup v1 within $RELEASE_SECONDS s (dying cgroups)" >&2; exit 3; }
  done
  # A mount namespace of its own keeps cgroup2 on /sys/fs/cgroup (where runc and containerd look) away from the
  # host; a bind mount of its nsfs file keeps it alive between commands. The bind must sit on a private mount.
  mkdir -p "$STATE/ns"
  mount --bind "$STATE/ns" "$STATE/ns"
  mount --make-private "$STATE/ns"
  touch "$STATE/ns/mnt"
  unshare --mount="$STATE/ns/mnt" --propagation private mount -t cgroup2 cgroup2 /sys/fs/cgroup
  trap - EXIT
  echo "$STATE/ns/mnt"
}

leave() {
  [[ -d "$STATE" ]] || { rm -rf "$STATE.tmp"; return 0; }
  local status=0 left="" ns proc
  if mountpoint -q "$STATE/ns/mnt" 2>/dev/null; then
    ns="mnt:[$(stat -L -c %i "$STATE/ns/mnt")]"
    for proc in /proc/[0-9]*; do
      [[ "$(readlink "$proc/ns/mnt" 2>/dev/null)" != "$ns" ]] || left+=" ${proc#/proc/}($(cat "$proc/comm" 2>/dev/null))"
    done
    umount "$STATE/ns/mnt"
  fi
  mountpoint -q "$STATE/ns" 2>/dev/null && umount "$STATE/ns"
  [[ -z "$left" ]] || { echo "cgroupv2.sh: processes left in the cgroup v2 namespace:$left" >&2; status=1; }

  # cgroup2 gets back the subtree_control it had: first the empty cgroups made since enter under a moved controller
  # (a hybrid run of someone else's may have made others), then every controller enabled since, bottom up (a parent
  # cannot disable what a child still uses).
  local dir c now=() extra=()
  read -r -a now <"$UNIFIED/cgroup.subtree_control" || true  # an empty file is EOF at once
  for c in "${now[@]}"; do
    [[ " $(cat "$STATE/subtree_control") " == *" $c "* ]] || extra+=("$c")
  done
  find "$UNIFIED" -mindepth 1 -depth -type d | while read -r dir; do
    if ! grep -qxF "$dir" "$STATE/v2-dirs" && moved "$dir"; then
      retry 2 rmdir "$dir" || echo "cgroupv2.sh: could not remove $dir" >&2
    fi
  done
  find "$UNIFIED" -depth -type d | while read -r dir; do
    for c in "${extra[@]}"; do
      [[ " $(cat "$dir/cgroup.subtree_control" 2>/dev/null) " != *" $c "* ]] ||
        retry 10 write "$dir/cgroup.subtree_control" "-$c"
    done
  done

  local point mntopts source superopts
  while IFS='|' read -r point mntopts source superopts; do
    mountpoint -q "$point" || retry 10 mount -t cgroup -o "$mntopts,$superopts" "$source" "$point"
  done <"$STATE/mounts"
  diff <(sort "$STATE/mounts") <(targets | sort) >&2 || die "the v1 mounts differ from those recorded in $STATE/mounts"
  diff <(cat "$STATE/subtree_control") "$UNIFIED/cgroup.subtree_control" >&2 ||
    die "$UNIFIED/cgroup.subtree_control differs from the one recorded in $STATE"
  rm -rf "$STATE"
  return $status
}

# One enter or leave at a time: the lock is on this script itself, so it leaves no file behind.
exec 9<"$0"
[[ "${1:-}" == check ]] || flock -w 30 9 || die "another cgroupv2.sh enter or leave did not finish within 30 s"

case "${1:-}" in
  # Nothing to fetch. But empty leftovers of earlier container runs become dying cgroups when removed, which hold
  # their controller in v1 for a minute or two: removed now, they are gone by the time the tests move controllers.
  install) tidy ;;
  check) check ;;
  enter) enter ;;
  leave) leave ;;
  *) echo "usage: $0 install | check | enter | leave" >&2; exit 2 ;;
esac
