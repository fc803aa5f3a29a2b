#!/usr/bin/env bash
# Local memory bandwidth from `dra-cpu bench numa` next to likwid-bench's STREAM kernels (Debian's likwid), both
# run on the CPUs and memory of one NUMA node (numactl), best of REPEAT runs each. Needs root for apt-get.
#   NODE=0 SIZE=1G REPEAT=3 hack/bench/numa-vs-stream.sh
# SIZE is bytes per array, as dra-cpu's --size; likwid-bench gets the same total over its 2 (copy) or 3 (stream)
# vectors. DRA_CPU overrides the dra-cpu command (default .venv/bin/dra-cpu).
set -euo pipefail
cd "$(dirname "$0")/../.."

node="${NODE:-0}"
size="${SIZE:-1G}"
repeat="${REPEAT:-3}"
dra_cpu="${DRA_CPU:-.venv/bin/dra-cpu}"

if ! command -v numactl >/dev/null || ! command -v likwid-bench >/dev/null; then
  echo "numa-vs-stream: installing numactl and likwid from Debian" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq numactl likwid >/dev/null
fi
[[ -n "${DRA_CPU:-}" ]] || hack/install.sh --test

size_mib=$(.venv/bin/python -c 'import sys; from dra_cpu.bench.numa import parse_size; print(parse_size(sys.argv[1]) >> 20)' "$size")
cpus=$(cat "/sys/devices/system/node/node${node}/cpulist")
threads=$(.venv/bin/python -c 'import sys; from dra_cpu.core.cpuset import CPUSet; print(len(CPUSet.parse(sys.argv[1])))' "$cpus")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

best() { sort -g | tail -1; }

likwid() {  # kernel, vectors -> best GB/s
  for _ in $(seq "$repeat"); do
    numactl --cpunodebind="$node" --membind="$node" \
      likwid-bench -t "$1" -w "M${node}:$(($2 * size_mib))MB:${threads}" 2>/dev/null |
      awk '/^MByte\/s:/ {print $2 / 1000}'
  done | best
}

for k in $(seq "$repeat"); do
  numactl --cpunodebind="$node" $dra_cpu bench numa --size "$size" --iterations 5 --latency-steps 200000 -o json \
    >"$out/run$k.json" 2>/dev/null
done
ours() {  # field -> best over the runs, local pair only; "invalid" if placement failed
  .venv/bin/python - "$1" "$node" "$out"/run*.json <<'PY'
import json, sys
field, node, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
values = [r[field] for f in files for r in json.load(open(f))["results"]
          if r["cpuNode"] == node and r["memoryNode"] == node and r["valid"]]
print(max(values) if values else "invalid")
PY
}

dra_triad=$(ours triadGBps)
dra_copy=$(ours copyGBps)
lw_stream=$(likwid stream 3)
lw_copy=$(likwid copy 2)
lw_copy_mem=$(likwid copy_mem 2)

echo "node ${node} (cpus ${cpus}, ${threads} threads), arrays ${size_mib} MiB, best of ${repeat}; $(uname -r)"
echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
printf '%-34s %10s\n' "dra-cpu bench numa triad GB/s" "$dra_triad" "likwid-bench stream GB/s" "$lw_stream" \
  "dra-cpu bench numa copy GB/s" "$dra_copy" "likwid-bench copy GB/s" "$lw_copy" \
  "likwid-bench copy_mem GB/s" "$lw_copy_mem"
.venv/bin/python - "$dra_triad" "$lw_stream" <<'PY'
import sys
ours, theirs = float(sys.argv[1]), float(sys.argv[2])
ratio = ours / theirs
print(f"triad dra-cpu / likwid-bench: {ratio:.2f} -> {'within' if abs(ratio - 1) <= 0.2 else 'NOT within'} 20%")
sys.exit(0 if abs(ratio - 1) <= 0.2 else 1)
PY
