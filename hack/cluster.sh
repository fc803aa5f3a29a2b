#!/usr/bin/env bash
# A real Kubernetes cluster on this machine, to see dra-cpu at work as its users do (docs/tour.md walks through it):
# the control plane, this machine as node 127.0.0.1, with --numa-guest a multi-NUMA qemu guest (24 CPUs, two NUMA
# nodes, hugepages, isolated CPUs) as node 127.0.0.2, and dra-cpu built from this checkout and installed with helm.
# A development and evaluation tool (the test harness's pieces, tests/harness/local_cluster), not part of the driver.
#   hack/cluster.sh up [--numa-guest]   install what is missing (hack/install.sh --test, hack/install-testenv.sh:
#                                       cached; the first run builds Kubernetes, about 16 min), start the cluster in
#                                       the background, show its progress, then print the kubeconfig and what to run
#   hack/cluster.sh down                stop it and remove everything it made (processes, mounts, cgroups, network)
#   hack/cluster.sh status              whether it is up, its nodes and the driver's pods
#   hack/cluster.sh kubeconfig          the path of the cluster admin's kubeconfig
# Needs root. Its state: /var/lib/dra-cpu-cluster (DRA_CPU_CLUSTER_DIR names another folder). Running `up` again is
# safe: it says the cluster is up.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == up ]]; then
  hack/install.sh --test
  hack/install-testenv.sh
fi
exec .venv/bin/python -m tests.harness.local_cluster "$@"
