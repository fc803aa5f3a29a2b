"""hack/cluster.sh: a local cluster on this machine (cluster.py) that outlives the command that starts it.

    python -m tests.harness.local_cluster up [--numa-guest]   start it, or say it is up; then how to use it
    python -m tests.harness.local_cluster down                stop it, and remove whatever it left
    python -m tests.harness.local_cluster status              up or not, its nodes and the driver's pods
    python -m tests.harness.local_cluster kubeconfig          the cluster admin's kubeconfig

`up` starts a supervisor (`supervise`, a process in a session of its own) that starts the pieces (LocalCluster) and
holds them until it gets SIGTERM, then stops them; `up` shows the supervisor's log until the cluster is ready or has
failed. The supervisor holds <folder>/supervisor.lock while it lives, so that a taken lock says a cluster is up (or
on its way); <folder>/status.json says which state it is in. DRA_CPU_CLUSTER_DIR names another folder than
/var/lib/dra-cpu-cluster: a second cluster beside the first (the tests use one).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from tests.harness.cluster.helm import Helm
from tests.harness.component import Unavailable
from tests.harness.local_cluster.cluster import MEMBER_ENV, ClusterFolder, Leftovers, LocalCluster, leftovers
from tests.harness.paths import REPO
from tests.harness.poll import wait_until

COMMAND_LOCK = Path("/run/lock/dra-cpu-cluster.lock")
"""Held by `up` and `down` while they decide and act, so that two of them never act on one cluster at once."""
STOP_SECONDS = 900.0
"""For the supervisor to stop the cluster on SIGTERM (draining the guest's pods takes minutes under TCG)."""
READY, STARTING, FAILED = "ready", "starting", "failed"


def folder_from_env() -> ClusterFolder:
    return ClusterFolder(Path(os.environ.get("DRA_CPU_CLUSTER_DIR", str(ClusterFolder().path))))


def log_path(folder: ClusterFolder) -> Path:
    return folder.path / "cluster.log"


def read_status(folder: ClusterFolder) -> dict[str, Any]:
    try:
        status: dict[str, Any] = json.loads((folder.path / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return status


def write_status(folder: ClusterFolder, **status: Any) -> None:
    temporary = folder.path / "status.json.tmp"
    temporary.write_text(json.dumps(status, indent=2) + "\n")
    temporary.rename(folder.path / "status.json")


def supervisor_alive(folder: ClusterFolder) -> bool:
    """Whether a supervisor holds the folder's lock (flock: it is released when the process ends, however)."""
    try:
        fd = os.open(folder.path / "supervisor.lock", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def command_lock() -> Iterator[None]:
    COMMAND_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with COMMAND_LOCK.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("cluster: another `hack/cluster.sh up` or `down` is running; waiting for it", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# ----------------------------------------------------------------------------------------------------------------
# The supervisor.


class Stop(BaseException):
    """SIGTERM: stop the cluster (a BaseException, so that it passes through the pieces' own error handling)."""


def supervise(folder: ClusterFolder, numa_guest: bool) -> int:
    lock = os.open(folder.path / "supervisor.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)

    def say(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    def stop(signum: int, frame: FrameType | None) -> NoReturn:
        # Once: the stop that follows is not to be interrupted.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        raise Stop

    status: dict[str, Any] = {"pid": os.getpid(), "numaGuest": numa_guest, "kubeconfig": str(folder.kubeconfig)}
    write_status(folder, **status, state=STARTING)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    cluster = LocalCluster(folder, numa_guest, say=say)
    try:
        with cluster:
            _link_tools(folder, cluster)
            write_status(folder, **status, state=READY, since=time.time())
            say("ready")
            while True:
                signal.pause()
    except Stop:
        say("stopped")
        return 0
    except (Exception, Unavailable) as err:  # what no piece caught: say it where `up` reads it
        write_status(folder, **status, state=FAILED, error=f"{type(err).__name__}: {err}")
        say(f"failed: {type(err).__name__}: {err}")
        return 1


def _link_tools(folder: ClusterFolder, cluster: LocalCluster) -> None:
    """kubectl, helm and dra-cpu of this cluster, in one folder for the user's PATH."""
    folder.bin.mkdir(exist_ok=True)
    tools = {
        "kubectl": cluster.plane.binaries.path("kubectl"),
        "helm": Helm.installed().binary,
        "dra-cpu": REPO / ".venv" / "bin" / "dra-cpu",
    }
    for name, target in tools.items():
        (folder.bin / name).unlink(missing_ok=True)
        (folder.bin / name).symlink_to(target)


# ----------------------------------------------------------------------------------------------------------------
# The commands.


def up(folder: ClusterFolder, numa_guest: bool) -> int:
    with command_lock():
        offset = 0
        if supervisor_alive(folder):
            status = read_status(folder)
            if numa_guest and not status.get("numaGuest"):
                print("cluster: it is up without the NUMA guest; `hack/cluster.sh down`, then `up --numa-guest`")
                return 1
            print(f"cluster: already {'up' if status.get('state') == READY else 'starting'} ({folder.path})")
            offset = log_path(folder).stat().st_size if status.get("state") == READY else 0
        else:
            clean(folder)
            folder.path.mkdir(parents=True)
            argv = [sys.executable, "-m", "tests.harness.local_cluster", "supervise"]
            env = {**os.environ, "DRA_CPU_CLUSTER_DIR": str(folder.path), MEMBER_ENV: str(folder.path)}
            with log_path(folder).open("ab") as log:
                subprocess.Popen(
                    [*argv, *(["--numa-guest"] if numa_guest else [])],
                    cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, env=env,
                )  # fmt: skip
            print(f"cluster: starting in {folder.path} (log: {log_path(folder)})", flush=True)
            # The supervisor takes its lock first thing: wait for it, so that `follow` knows it runs (or for what it
            # wrote, should it have ended already). A bool: wait_until takes any other value, {} included, as done.
            wait_until(
                lambda: supervisor_alive(folder) or bool(read_status(folder)), "the supervisor to start", 60, 0.1
            )
    try:
        state = follow(folder, offset, until={READY, FAILED})
    except KeyboardInterrupt:
        print("\ncluster: no longer following; it goes on starting (`hack/cluster.sh status`, `down`)")
        return 130
    if state != READY:
        print(f"cluster: did not start: {read_status(folder).get('error', 'see the log above')}")
        return 1
    print(usage(folder))
    return 0


def follow(folder: ClusterFolder, offset: int, until: set[str], timeout: float = float("inf")) -> str:
    """Prints the supervisor's log from `offset` on until its state is one of `until`, it has exited ("exited"), or
    `timeout` seconds have passed ("timeout"); returns the state."""
    deadline = time.monotonic() + timeout
    with log_path(folder).open("rb") as log:
        log.seek(offset)
        while True:
            alive, state = supervisor_alive(folder), read_status(folder).get("state", "")
            sys.stdout.write(log.read().decode(errors="replace"))
            sys.stdout.flush()
            if state in until or not alive:
                return state if alive or state == FAILED else "exited"
            if time.monotonic() > deadline:
                return "timeout"
            time.sleep(0.5)


def usage(folder: ClusterFolder) -> str:
    kubectl = [str(folder.bin / "kubectl"), "--kubeconfig", str(folder.kubeconfig)]
    nodes = subprocess.run([*kubectl, "get", "nodes", "-o", "wide"], capture_output=True, text=True, check=False)
    return f"""
cluster: up. Its nodes:
{nodes.stdout}
kubectl: {(folder.bin / "kubectl").resolve()} (the test environment's, linked in {folder.bin})
kubeconfig: {folder.kubeconfig}
As the cluster admin, the app developer and the driver developer (docs/tour.md walks through all three):
  export KUBECONFIG={folder.kubeconfig} PATH={folder.bin}:$PATH
  kubectl get resourceslices -o wide
  kubectl apply -f hack/examples/claim-cpu-capacity-20.yaml && kubectl logs -f pod-cpu-capacity-20
  dra-cpu status --kubeconfig $KUBECONFIG
  dra-cpu explain hack/examples/claim-cpu-capacity-20.yaml --kubeconfig $KUBECONFIG
  hack/cluster.sh status | down"""


def down(folder: ClusterFolder) -> int:
    with command_lock():
        if supervisor_alive(folder):
            pid = int(read_status(folder)["pid"])
            print(f"cluster: stopping (supervisor {pid})", flush=True)
            offset = log_path(folder).stat().st_size
            os.kill(pid, signal.SIGTERM)
            if follow(folder, offset, until=set(), timeout=STOP_SECONDS) == "timeout":
                print(f"cluster: the supervisor did not stop in {STOP_SECONDS:.0f} s; killing what is left")
                os.kill(pid, signal.SIGKILL)
        left = clean(folder)
    print("cluster: down; nothing of it is left" if not left else f"cluster: down; removed what it left: {left}")
    return 0


def clean(folder: ClusterFolder) -> Leftovers:
    """Removes what a cluster that is not running left on this machine, and its folder; returns what there was
    besides the folder (nothing, after a cluster that stopped as it should)."""
    left = leftovers(folder)
    if left:
        sweep(left)
    shutil.rmtree(folder.path, ignore_errors=True)
    return left


def sweep(left: Leftovers) -> None:
    """Kills the processes (SIGTERM, SIGKILL after 10 s), unmounts the mounts, removes the cgroups and interfaces."""
    for pid in left.processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in left.processes):
        time.sleep(0.2)
    for pid in left.processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for mount in sorted(left.mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
    for cgroup in left.cgroups:
        for path in [*sorted(cgroup.rglob("*/"), key=lambda p: len(p.parts), reverse=True), cgroup]:
            with contextlib.suppress(OSError):
                path.rmdir()
    for interface in left.interfaces:
        subprocess.run(["ip", "link", "del", interface], capture_output=True, check=False)


def status(folder: ClusterFolder) -> int:
    if not supervisor_alive(folder):
        failed = read_status(folder).get("error")
        print(f"cluster: down{f' (it failed: {failed})' if failed else ''}")
        return 3
    state = read_status(folder).get("state", STARTING)
    print(f"cluster: {'up' if state == READY else state} ({folder.path}, log: {log_path(folder)})")
    if state != READY:
        return 1
    kubectl = [str(folder.bin / "kubectl"), "--kubeconfig", str(folder.kubeconfig)]
    for args in (["get", "nodes", "-o", "wide"], ["-n", "kube-system", "get", "pods", "-o", "wide"]):
        print(subprocess.run([*kubectl, *args], capture_output=True, text=True, check=False).stdout)
    return 0


def kubeconfig(folder: ClusterFolder) -> int:
    if not supervisor_alive(folder):
        print("cluster: down", file=sys.stderr)
        return 3
    print(folder.kubeconfig)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/cluster.sh", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "supervise"):
        command = commands.add_parser(name)
        command.add_argument(
            "--numa-guest", action="store_true", help="add the multi-NUMA qemu guest as a second node (minutes)"
        )
    for name in ("down", "status", "kubeconfig"):
        commands.add_parser(name)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("cluster: needs root (the kubelet, containerd, qemu's shares)", file=sys.stderr)
        return 2
    folder = folder_from_env()
    if args.command == "up":
        return up(folder, args.numa_guest)
    if args.command == "supervise":
        return supervise(folder, args.numa_guest)
    return {"down": down, "status": status, "kubeconfig": kubeconfig}[args.command](folder)


if __name__ == "__main__":
    sys.exit(main())
