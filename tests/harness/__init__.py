"""The test harness: a real Kubernetes cluster, real nodes, container runtimes and a multi-NUMA guest on one machine,
for the tests and the benchmarks in hack/bench. README.md beside this file says what each piece is and costs."""
