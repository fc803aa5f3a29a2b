"""The multi-NUMA test guest: a throwaway virtual machine, booted with qemu, whose real kernel has the NUMA nodes,
SMT siblings, hugepages and isolated CPU this machine lacks.

    with boot(require_built()) as guest:
        print(guest.run(["numactl", "--hardware"]).stdout)

hack/testenv/guest.sh builds Debian's own kernel, an initramfs and a Debian rootfs (python3, runc, containerd); `boot`
starts them with `qemu-system-x86_64 -accel tcg -cpu max,vendor=GenuineIntel` (KVM hangs on the test machines)
in the topology of a `GuestSpec` (by default `SPEC`: 2 sockets x 2 cores x 2 threads, NUMA nodes 0 and 1 with 4 CPUs
each, a memory-only node 2, distances, 2 MiB hugepages reserved per node on the kernel command line, one CPU in
`isolcpus=`), pure cgroup v2 and no network. It boots in 10 to 40 s on two busy cores.
A guest booted with `forwards` (the guest kubelet node, tests/harness/nodes/guest_kubelet.py) has a NIC on qemu's
user-mode network with restrict=on: it reaches the given ports of the host's loopback at GUEST_HOST and nothing
else (each connection is relayed by relay.py, a process on the host). With `inbound`, qemu listens on the given
loopback addresses and ports of the host and forwards each connection to the same port of the guest: that is all
that reaches it. With `shares`, host folders are mounted read-only at their own paths too.
The project checkout is shared read-only over 9p at the host's own path, with the host's .venv site-packages on the
guest's PYTHONPATH (both pythons are Debian 12's 3.11), so the guest runs this very checkout: `python3 -m dra_cpu`.
The host drives the guest through `Guest`, which talks to the agent inside it (inside/agent.py) over a virtio-serial
port.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from tests.harness.component import Unavailable
from tests.harness.paths import REPO
from tests.harness.poll import wait_until

ROOT = REPO
SCRIPT = ROOT / "hack" / "testenv" / "guest.sh"
RELAY = Path(__file__).resolve().parent / "relay.py"
AGENT_PORT = "dra-agent"
GUEST_HOST = "10.0.2.100"
"""Where a guest booted with `forwards` reaches those ports of the host's loopback."""
GUEST_ADDRESS, GUEST_GATEWAY = "10.0.2.15", "10.0.2.2"
"""qemu's user-mode defaults (its first DHCP lease and its gateway), set by hand: the guest has no DHCP client."""
BOOT_TIMEOUT = 360.0
"""TCG on 2 busy host cores: the boot itself takes 15 to 40 s; the rest is headroom for a loaded machine."""


@dataclass(frozen=True)
class NodeSpec:
    """One NUMA node of the guest: its CPUs (none for a memory-only node), memory and 2 MiB pages reserved."""

    id: int
    cpus: tuple[int, ...]
    memory_mib: int
    hugepages_2m: int


@dataclass(frozen=True)
class GuestSpec:
    """The machine qemu emulates; the tests compare what the guest kernel reports with it."""

    sockets: int = 2
    cores: int = 2
    threads: int = 2
    nodes: tuple[NodeSpec, ...] = (
        NodeSpec(0, (0, 1, 2, 3), 1024, 32),
        NodeSpec(1, (4, 5, 6, 7), 1024, 32),
        NodeSpec(2, (), 512, 8),
    )
    distances: Mapping[tuple[int, int], int] = field(default_factory=lambda: {(0, 1): 21, (0, 2): 31, (1, 2): 41})
    isolated_cpus: tuple[int, ...] = (7,)

    @property
    def cpus(self) -> int:
        return self.sockets * self.cores * self.threads

    def socket_of(self, cpu: int) -> int:
        """qemu numbers CPUs socket by socket, core by core, thread by thread."""
        return cpu // (self.cores * self.threads)

    def siblings_of(self, cpu: int) -> tuple[int, ...]:
        first = cpu - cpu % self.threads
        return tuple(range(first, first + self.threads))

    def distance(self, a: int, b: int) -> int:
        return 10 if a == b else self.distances[(min(a, b), max(a, b))]

    def node_of(self, cpu: int) -> int:
        return next(n.id for n in self.nodes if cpu in n.cpus)

    @property
    def memory_nodes(self) -> frozenset[int]:
        """The nodes with memory: the cpuset.mems of containers without claims, and of claims that ask for no memory
        (their memory is preferred on their CPUs' nodes, not bound: docs/user.md)."""
        return frozenset(n.id for n in self.nodes if n.memory_mib)

    def kernel_args(self) -> list[str]:
        pages = ",".join(f"{n.id}:{n.hugepages_2m}" for n in self.nodes if n.hugepages_2m)
        return [
            "console=ttyS0",
            "panic=-1",
            "mitigations=off",
            f"isolcpus={','.join(map(str, self.isolated_cpus))}",
            "default_hugepagesz=2M",
            "hugepagesz=2M",
            f"hugepages={pages}",
        ]

    def qemu_args(self) -> list[str]:
        memory = sum(n.memory_mib for n in self.nodes)
        args = [
            "-accel", "tcg",
            # TCG's AMD model cannot report SMT (no topoext); with Intel's CPUID leaves the guest sees the threads.
            "-cpu", "max,vendor=GenuineIntel",
            "-smp", f"{self.cpus},sockets={self.sockets},cores={self.cores},threads={self.threads}",
            "-m", f"{memory}M",
        ]  # fmt: skip
        for n in self.nodes:
            args += ["-object", f"memory-backend-ram,id=mem{n.id},size={n.memory_mib}M"]
            cpus = f",cpus={n.cpus[0]}-{n.cpus[-1]}" if n.cpus else ""
            args += ["-numa", f"node,nodeid={n.id}{cpus},memdev=mem{n.id}"]
        for (a, b), value in sorted(self.distances.items()):
            args += ["-numa", f"dist,src={a},dst={b},val={value}"]
        return args

    def device_args(self) -> list[str]:
        """qemu arguments placed after the guest's own devices (a device without `bus=` goes on the newest bus, so
        expander buses and their devices must come last)."""
        return []


SPEC = GuestSpec()


class GuestError(RuntimeError):
    """The guest did not boot, the agent failed a request, or a command in the guest did not exit 0."""


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str
    seconds: float

    def json(self) -> Any:
        return json.loads(self.stdout)


@dataclass
class Guest:
    """A booted guest: run commands in it, read and write its files. Every call is timed (`timings`)."""

    spec: GuestSpec
    process: subprocess.Popen[bytes]
    workdir: Path
    boot_seconds: float = 0.0
    timings: list[tuple[str, float]] = field(default_factory=list)
    _socket: socket.socket | None = None
    _buffer: bytes = b""
    _ids: Iterator[int] = field(default_factory=itertools.count)

    @property
    def console(self) -> Path:
        """The guest's serial console: the kernel's messages, its init and the agent's log."""
        return self.workdir / "console.log"

    def console_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no console log)"

    # The wire: one JSON request per line, one JSON reply per line, in order.
    def _send(self, request: dict[str, Any]) -> int:
        assert self._socket is not None
        request_id = next(self._ids)
        self._socket.sendall((json.dumps({**request, "id": request_id}) + "\n").encode())
        return request_id

    def _receive(self, request_id: int, timeout: float) -> dict[str, Any] | None:
        assert self._socket is not None
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                reply: dict[str, Any] = json.loads(line)
                if reply.get("id") == request_id:
                    return reply
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._socket.settimeout(min(left, 1.0))
            try:
                chunk = self._socket.recv(1 << 20)
            except TimeoutError:
                if self.process.poll() is not None:
                    raise GuestError(f"qemu exited ({self.process.returncode}):\n{self.console_tail()}") from None
                continue
            if not chunk:
                raise GuestError(f"the agent's channel closed:\n{self.console_tail()}")
            self._buffer += chunk

    def request(self, op: str, timeout: float = 300.0, **fields: Any) -> dict[str, Any]:
        start = time.monotonic()
        request_id = self._send({"op": op, **fields})
        reply = self._receive(request_id, timeout + 30)
        what = fields.get("argv") or fields.get("path") or fields.get("function") or fields.get("pid") or ""
        self.timings.append((f"{op} {what}"[:160], time.monotonic() - start))
        if reply is None:
            raise GuestError(f"no answer to {op} within {timeout + 30:.0f} s:\n{self.console_tail()}")
        if "error" in reply:
            raise GuestError(f"{op} failed in the guest: {reply['error']}")
        return reply

    # What tests use.
    def run(
        self,
        argv: Sequence[str] | str,
        *,
        check: bool = True,
        timeout: float = 300.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> Result:
        """Run a command in the guest (a string goes to `bash -c`) and wait for it; `check`: fail unless it exits 0."""
        args = ("bash", "-c", argv) if isinstance(argv, str) else tuple(argv)
        reply = self.request("run", timeout, argv=list(args), input=input, env=dict(env or {}), cwd=cwd)
        result = Result(args, reply["rc"], reply["stdout"], reply["stderr"], reply["seconds"])
        if reply.get("timedOut"):
            raise GuestError(f"{shlex.join(args)} timed out after {timeout} s in the guest:\n{result.stderr[-4000:]}")
        if check and result.rc != 0:
            raise GuestError(
                f"{shlex.join(args)} exited {result.rc} in the guest:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def python(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 300.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Result:
        """The guest's python3 with this checkout and the host's site-packages importable."""
        return self.run(["python3", *args], check=check, timeout=timeout, input=input, env=env, cwd=str(ROOT))

    def dra_cpu(
        self, *args: str, check: bool = True, timeout: float = 300.0, env: Mapping[str, str] | None = None
    ) -> Result:
        """The driver's command line, as `python3 -m dra_cpu` (the host's console script names the host's python)."""
        return self.python("-m", "dra_cpu", *args, check=check, timeout=timeout, env=env)

    def spawn(self, argv: Sequence[str], log: str, env: Mapping[str, str] | None = None) -> int:
        """Start a process in its own session, its output appended to `log`; returns its pid."""
        pid: int = self.request("spawn", argv=list(argv), log=log, env=dict(env or {}), cwd=str(ROOT))["pid"]
        return pid

    def wait(self, pid: int, timeout: float) -> int | None:
        """The exit status of a spawned process, once it has exited within `timeout`; None while it runs."""
        rc: int | None = self.request("wait", timeout=timeout, pid=pid, seconds=timeout)["rc"]
        return rc

    def read(self, path: str) -> str:
        text: str = self.request("read", path=path)["text"]
        return text

    def write(self, path: str, text: str) -> None:
        self.request("write", path=path, text=text)

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """A binary file (the agent's `write` takes text), through base64 on stdin."""
        self.run(["sh", "-c", f"base64 -d >{shlex.quote(path)} && chmod {mode:o} {shlex.quote(path)}"],
                 input=base64.b64encode(data).decode())  # fmt: skip

    def mount_shares(self, shares: Sequence[Path]) -> None:
        """Mounts the host folders that boot() shared, read-only at their host paths."""
        for index, path in enumerate(shares):
            where = shlex.quote(str(path))
            self.run(
                f"mkdir -p {where} && mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose "
                f"{_share_tag(index)} {where}"
            )

    def network_up(self) -> None:
        """Gives the NIC (its driver, virtio_net, is loaded by the initramfs) qemu's user-mode address and route."""
        nic = self.run(
            "for i in $(seq 100); do for n in /sys/class/net/*; do [ -e $n/device ] && { echo ${n##*/}; exit 0; };"
            " done; sleep 0.1; done; exit 3",
            check=False,
        )
        if nic.rc != 0:
            raise GuestError(f"no network interface:\n{self.console_tail()}")
        name = nic.stdout.strip()
        self.run(
            f"busybox ip addr add {GUEST_ADDRESS}/24 dev {name} && busybox ip link set {name} up && "
            f"busybox ip route add default via {GUEST_GATEWAY}"
        )

    def uptime(self) -> float:
        return float(self.request("ping", timeout=10)["uptime"])

    # Life cycle.
    def connect(self, socket_path: Path, timeout: float) -> None:
        """Connect to qemu's end of the agent's port and wait until the agent answers a ping."""
        start = time.monotonic()

        def qemu_exited() -> str:
            return "" if self.process.poll() is None else f"qemu exited ({self.process.returncode}) while booting"

        def logs() -> str:
            return f"logs in {self.workdir}:\n{self.console_tail()}"

        wait_until(
            socket_path.exists, "qemu's end of the agent's port", timeout, 0.05, abort=qemu_exited, error=GuestError
        )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(socket_path))
        self._socket = sock
        sent = -1

        # Pings sent before the agent opened its port may be lost: ask again until one is answered.
        def answered() -> bool:
            nonlocal sent
            try:
                sent = self._send({"op": "ping"})
            except TimeoutError:
                # qemu keeps what the guest has not read, and stops taking more: a slow boot (a loaded host) fills
                # that up with pings. The agent answers them all once it reads; wait for the last one sent.
                if sent < 0:
                    return False
            return self._receive(sent, 3.0) is not None

        left = timeout - (time.monotonic() - start)
        wait_until(answered, "the guest's agent to answer", left, 0, abort=qemu_exited, details=logs, error=GuestError)
        self.boot_seconds = time.monotonic() - start

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Powers the guest off and removes its folder (its disk's overlay, console and logs)."""
        self.poweroff()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def poweroff(self) -> None:
        try:
            if self._socket is not None and self.process.poll() is None:
                self.request("poweroff", timeout=10)
                self.process.wait(timeout=30)
        except (GuestError, OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            if self._socket is not None:
                self._socket.close()


def require_built() -> Path:
    """The directory of hack/testenv/guest.sh's build; Unavailable when there is none (or no qemu)."""
    build, why = built()
    if build is None:
        raise Unavailable(why)
    return build


def built() -> tuple[Path | None, str]:
    """The directory of hack/testenv/guest.sh's build, or None and why there is none."""
    if shutil.which("qemu-system-x86_64") is None:
        return None, "qemu-system-x86_64 is not installed: run hack/testenv/guest.sh install"
    done = subprocess.run(["bash", str(SCRIPT), "installed"], capture_output=True, text=True)
    if done.returncode != 0:
        return None, "the test guest is not built for this hack/testenv/guest.sh: run hack/testenv/guest.sh install"
    return Path(done.stdout.strip()), ""


def _share_tag(index: int) -> str:
    return f"dra-share{index}"


def network_args(forwards: Sequence[int], inbound: Sequence[tuple[str, int]] = ()) -> list[str]:
    """A user-mode NIC through which the guest reaches the host's loopback `forwards` ports at GUEST_HOST, and
    nothing else (restrict=on, which leaves explicit forwards be). Each connection runs relay.py: a chardev target
    would take one connection only, for the life of qemu. Each (address, port) of `inbound` is a host loopback
    address on which qemu listens and forwards to that port of the guest."""
    # qemu reads a comma in an option's value as the next option unless doubled.
    rules = [
        f"guestfwd=tcp:{GUEST_HOST}:{port}-cmd:"
        + shlex.join([sys.executable, "-I", "-S", str(RELAY), str(port)]).replace(",", ",,")
        for port in forwards
    ]
    rules += [f"hostfwd=tcp:{address}:{port}-:{port}" for address, port in inbound]
    return ["-netdev", f"user,id=net,restrict=on,{','.join(rules)}", "-device", "virtio-net-pci,netdev=net"]


def boot(
    build: Path,
    spec: GuestSpec = SPEC,
    *,
    forwards: Sequence[int] = (),
    inbound: Sequence[tuple[str, int]] = (),
    shares: Sequence[Path] = (),
    workdir: Path | None = None,
) -> Guest:
    """Boot the guest and wait for its agent. The disk is a throwaway snapshot; the checkout is shared read-only.
    With `forwards`, the guest reaches those ports of the host's loopback at GUEST_HOST (and nothing else), and
    `inbound` (address, port) pairs of the host's loopback reach that port of the guest; `shares` are host folders it
    gets read-only at their own paths. Its console, logs and disk overlay go in `workdir` (a new folder below /tmp
    unless given), which `Guest.shutdown` removes."""
    networked = bool(forwards or inbound)
    # Short: the agent's socket path must fit a unix socket address.
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="dra-guest-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    agent = workdir / "agent.sock"
    kernel_args = [*spec.kernel_args(), f"dra_guest.src={ROOT}", f"dra_guest.agent={AGENT_PORT}"]
    argv = [
        "qemu-system-x86_64",
        *spec.qemu_args(),
        "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none",
        *(network_args(forwards, inbound) if networked else ["-nic", "none"]),
        "-serial", f"file:{workdir / 'console.log'}",
        "-kernel", str(build / "vmlinuz"),
        "-initrd", str(build / "initrd.img"),
        "-append", " ".join(kernel_args),
        # The disk as an explicit device (not `if=virtio`, which qemu places after every -device) so that it stays
        # on the first bus when device_args() adds buses.
        "-drive", f"file={build / 'rootfs.ext4'},format=raw,if=none,id=root,snapshot=on",
        "-device", "virtio-blk-pci,drive=root",
        "-virtfs", f"local,path={ROOT},mount_tag=src,security_model=none,readonly=on",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent,path={agent},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}",
        *(
            arg
            for index, path in enumerate(shares)
            for arg in ("-virtfs", f"local,path={path},mount_tag={_share_tag(index)},security_model=none,readonly=on")
        ),
        *spec.device_args(),
    ]  # fmt: skip
    (workdir / "qemu.cmd").write_text(shlex.join(argv) + "\n")
    # qemu writes the snapshot overlay of the disk under TMPDIR.
    env = {**os.environ, "TMPDIR": str(workdir)}
    with open(workdir / "qemu.log", "wb") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    guest = Guest(spec, process, workdir)
    try:
        guest.connect(agent, BOOT_TIMEOUT)
        guest.mount_shares(shares)
        if networked:
            guest.network_up()
    except BaseException:
        guest.poweroff()
        raise
    return guest
