"""Nodes: the one place a test gets a node from. A node is where the driver prepares claims; its kind says where the
driver runs, who plays the kubelet, and which runtime and kernel enforce the pins.

| kind (module)                       | the driver                     | the kubelet           | runtime, kernel     |
|-------------------------------------|--------------------------------|-----------------------|---------------------|
| published (published.py)            | none: its slices are published | none (a Node object)  | none                |
| stand-in (standin.py)               | in the test's process          | the test, over gRPC   | none                |
| daemon process (daemon_process.py)  | `dra-cpu run --standalone`     | the test, over gRPC   | none                |
| NRI (nri.py)                        | in the test's process, NRI on  | none                  | containerd, host    |
| real kubelet (real.py)              | the chart's DaemonSet pod      | real, on this machine | containerd, host    |
| guest stand-in (guest_standin.py)   | `dra-cpu run` in the guest     | the guest's agent     | containerd, guest   |
| guest kubelet (guest_kubelet.py)    | `dra-cpu run` in the guest     | real, in the guest    | containerd, guest   |

The real and the guest kubelet nodes are joined to the control plane (tests/harness/cluster) and share kubelet.py.
"""
