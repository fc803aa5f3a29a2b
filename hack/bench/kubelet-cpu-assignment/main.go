// Command kubelet-cpu-assignment replays a CPU allocation trace through the kubelet's own CPU manager
// (k8s.io/kubernetes/pkg/kubelet/cm/cpumanager, static policy) so that hack/bench/cpu_choice.py can compare its
// choices with dra-cpu's on the same trace. It is built by `hack/testenv/kubernetes.sh install` against the same
// k8s.io/kubernetes module as the test kubelet; the product never runs it.
//
// Input (stdin, JSON): the machine as cAdvisor reports it to the kubelet (online CPUs with their core, socket, NUMA
// node and L3 id), the variants to run (static policy options; optionally the topology manager's single-numa-node
// policy), and the trace: {"op": "alloc", "id": N, "cpus": K, "node": -1 | NUMA node} and {"op": "free", "id": N}.
// An alloc with a node is a claim on that NUMA node: the kubelet gets it as the topology manager's hint for that node.
//
// Output (stdout, JSON): per variant, per alloc in trace order, the CPUs chosen (or the error that rejected it) and
// the thread CPU time the choice took, in nanoseconds.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"sort"

	"github.com/go-logr/logr"
	cadvisorapi "github.com/google/cadvisor/lib/model"
	"golang.org/x/sys/unix"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/kubelet/cm/cpumanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/cpumanager/state"
	"k8s.io/kubernetes/pkg/kubelet/cm/cpumanager/topology"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager/bitmask"
	"k8s.io/kubernetes/pkg/kubelet/lifecycle"
	"k8s.io/utils/cpuset"
)

type cpu struct {
	ID     int `json:"id"`
	Core   int `json:"core"`
	Socket int `json:"socket"`
	Node   int `json:"node"`
	L3     int `json:"l3"`
}

type variant struct {
	Name            string            `json:"name"`
	Options         map[string]string `json:"options"`
	TopologyManager string            `json:"topologyManager"`
}

type op struct {
	Op   string `json:"op"`
	ID   int    `json:"id"`
	CPUs int    `json:"cpus"`
	Node int    `json:"node"`
}

type input struct {
	CPUs     []cpu     `json:"cpus"`
	Variants []variant `json:"variants"`
	Ops      []op      `json:"ops"`
}

type allocation struct {
	ID    int    `json:"id"`
	CPUs  []int  `json:"cpus"`
	Error string `json:"error,omitempty"`
	Ns    int64  `json:"ns"`
}

type result struct {
	Name        string       `json:"name"`
	Allocations []allocation `json:"allocations"`
}

// hintStore is the topology manager as the static policy sees it: the hint of the container being allocated.
type hintStore struct {
	hint   topologymanager.TopologyHint
	policy topologymanager.Policy
}

func (s *hintStore) GetAffinity(klog.Logger, string, string) topologymanager.TopologyHint {
	return s.hint
}
func (s *hintStore) GetPolicy() topologymanager.Policy { return s.policy }
func (s *hintStore) Name() string                      { return "bench" }

// machineInfo is what cAdvisor gives the kubelet: NUMA nodes of cores, each core with its threads, socket and L3
// (cAdvisor's "uncore cache"), nodes and cores in id order.
func machineInfo(cpus []cpu) *cadvisorapi.MachineInfo {
	info := &cadvisorapi.MachineInfo{NumCores: len(cpus)}
	sockets := map[int]bool{}
	sorted := append([]cpu(nil), cpus...)
	sort.Slice(sorted, func(i, j int) bool {
		a, b := sorted[i], sorted[j]
		return a.Node < b.Node || a.Node == b.Node && (a.Core < b.Core || a.Core == b.Core && a.ID < b.ID)
	})
	for _, c := range sorted {
		sockets[c.Socket] = true
		if n := len(info.Topology); n == 0 || info.Topology[n-1].Id != c.Node {
			info.Topology = append(info.Topology, cadvisorapi.Node{Id: c.Node})
		}
		node := &info.Topology[len(info.Topology)-1]
		if n := len(node.Cores); n == 0 || node.Cores[n-1].Id != c.Core {
			cache := cadvisorapi.Cache{Id: c.L3, Level: 3, Type: "Unified"}
			node.Cores = append(node.Cores, cadvisorapi.Core{Id: c.Core, SocketID: c.Socket, UncoreCaches: []cadvisorapi.Cache{cache}})
		}
		core := &node.Cores[len(node.Cores)-1]
		core.Threads = append(core.Threads, c.ID)
	}
	info.NumSockets = len(sockets)
	return info
}

func guaranteedPod(id, cpus int) (*v1.Pod, *v1.Container) {
	amounts := v1.ResourceList{
		v1.ResourceCPU:    *resource.NewQuantity(int64(cpus), resource.DecimalSI),
		v1.ResourceMemory: resource.MustParse("1Gi"),
	}
	pod := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("p%d", id), Namespace: "bench", UID: types.UID(fmt.Sprint(id))},
		Spec: v1.PodSpec{Containers: []v1.Container{
			{Name: "c", Resources: v1.ResourceRequirements{Requests: amounts, Limits: amounts}},
		}},
	}
	return pod, &pod.Spec.Containers[0]
}

func threadNanos() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		panic(err)
	}
	return ts.Nano()
}

func replay(in *input, v variant) (*result, error) {
	logger := logr.Discard()
	info := machineInfo(in.CPUs)
	topo, err := topology.Discover(logger, info)
	if err != nil {
		return nil, err
	}
	numa, err := topologymanager.NewNUMAInfo(info.Topology, topologymanager.PolicyOptions{})
	if err != nil {
		return nil, err
	}
	var tm topologymanager.Policy
	switch v.TopologyManager {
	case "":
	case topologymanager.PolicySingleNumaNode:
		tm = topologymanager.NewSingleNumaNodePolicy(numa, topologymanager.PolicyOptions{})
	default:
		return nil, fmt.Errorf("variant %s: unknown topology manager policy %q", v.Name, v.TopologyManager)
	}
	store := &hintStore{policy: topologymanager.NewNonePolicy()}
	// No reserved CPUs: dra-cpu's device holds every CPU of the trace, so the kubelet gets the same ones.
	policy, err := cpumanager.NewStaticPolicy(logger, topo, 0, cpuset.New(), store, v.Options)
	if err != nil {
		return nil, fmt.Errorf("variant %s: %w", v.Name, err)
	}
	s := state.NewMemoryState(logger)
	if err := policy.Start(logger, s); err != nil {
		return nil, fmt.Errorf("variant %s: %w", v.Name, err)
	}
	out := &result{Name: v.Name}
	for _, o := range in.Ops {
		uid := fmt.Sprint(o.ID)
		if o.Op == "free" {
			if err := policy.RemoveContainer(logger, s, uid, "c"); err != nil {
				return nil, fmt.Errorf("variant %s: free %d: %w", v.Name, o.ID, err)
			}
			continue
		}
		pod, container := guaranteedPod(o.ID, o.CPUs)
		start := threadNanos()
		err := allocate(logger, policy, s, store, tm, o, pod, container)
		a := allocation{ID: o.ID, Ns: threadNanos() - start, CPUs: []int{}}
		if err != nil {
			a.Error = err.Error()
		} else if got, ok := s.GetCPUSet(uid, "c"); ok {
			a.CPUs = got.List()
		}
		out.Allocations = append(out.Allocations, a)
	}
	return out, nil
}

// allocate is what the kubelet does at pod admission: the topology manager merges the CPU manager's hints (only
// with a topology manager policy; a claim on a NUMA node brings its own), then the static policy allocates.
func allocate(logger klog.Logger, policy cpumanager.Policy, s state.State, store *hintStore, tm topologymanager.Policy,
	o op, pod *v1.Pod, container *v1.Container) error {
	store.hint = topologymanager.TopologyHint{Preferred: true}
	switch {
	case o.Node >= 0:
		mask, err := bitmask.NewBitMask(o.Node)
		if err != nil {
			return err
		}
		store.hint = topologymanager.TopologyHint{NUMANodeAffinity: mask, Preferred: true}
	case tm != nil:
		hints := policy.GetTopologyHints(logger, s, pod, container, lifecycle.AddOperation)
		hint, admit := tm.Merge(logger, []map[string][]topologymanager.TopologyHint{hints})
		if !admit {
			return fmt.Errorf("topology manager %s: no admissible hint for %d CPUs", tm.Name(), o.CPUs)
		}
		store.hint = hint
	}
	return policy.Allocate(logger, s, pod, container, lifecycle.AddOperation)
}

func main() {
	// The CPU manager logs through the logger it is given (discarded); klog's own output goes too.
	klog.SetLogger(logr.Discard())
	runtime.LockOSThread()
	var in input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintf(os.Stderr, "kubelet-cpu-assignment: reading the trace: %v\n", err)
		os.Exit(2)
	}
	var results []*result
	for _, v := range in.Variants {
		r, err := replay(&in, v)
		if err != nil {
			fmt.Fprintf(os.Stderr, "kubelet-cpu-assignment: %v\n", err)
			os.Exit(1)
		}
		results = append(results, r)
	}
	if err := json.NewEncoder(os.Stdout).Encode(map[string]any{"results": results}); err != nil {
		fmt.Fprintf(os.Stderr, "kubelet-cpu-assignment: %v\n", err)
		os.Exit(1)
	}
}
