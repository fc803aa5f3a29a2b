"""The command agent inside the test guest (hack/testenv/guest.sh builds the guest; tests/harness/guest/vm.py
drives it).

Runs as root in the guest, started by its init with the guest's own python3 (standard library only), and serves one
JSON request per line on the virtio-serial port named on its command line, answering each with one JSON line:

  {"id": N, "op": "run", "argv": [...], "timeout": S, "input": TEXT?, "env": {...}?, "cwd": DIR?}
      -> {"id": N, "rc": RC, "stdout": TEXT, "stderr": TEXT, "seconds": S}   (rc -9 and "timedOut": true on timeout)
  {"id": N, "op": "spawn", "argv": [...], "log": FILE, "env": {...}?, "cwd": DIR?}   -> {"id": N, "pid": PID}
      a process in its own session, stdout and stderr to FILE; it outlives the request
  {"id": N, "op": "wait", "pid": PID, "seconds": S}   -> {"id": N, "rc": RC or null while it runs}
      for a spawned process (the agent reaps it: a zombie would still answer kill -0)
  {"id": N, "op": "read", "path": FILE}            -> {"id": N, "text": TEXT}
  {"id": N, "op": "write", "path": FILE, "text": TEXT}   -> {"id": N}
  {"id": N, "op": "call", "module": NAME, "function": F, "kwargs": {...}}   -> {"id": N, "result": VALUE}
      F(**kwargs) of NAME.py beside this file, imported once into the agent (so that what it holds, gRPC channels to
      containerd and the driver, lasts from call to call); a guest-side helper, see kubelet_calls.py
  {"id": N, "op": "ping"}                          -> {"id": N, "uptime": S}
  {"id": N, "op": "poweroff"}                      -> {"id": N}, then the guest powers off

A request that fails answers {"id": N, "error": MESSAGE}. Requests are served one at a time, in order.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from types import ModuleType
from typing import Any

_MODULES: dict[str, ModuleType] = {}
_SPAWNED: dict[int, subprocess.Popen[bytes]] = {}


def _module(name: str) -> ModuleType:
    """NAME.py beside this file, imported once; NAME must be a plain module name."""
    if name not in _MODULES:
        if not name.isidentifier():
            raise ValueError(f"not a module name: {name!r}")
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"guest_{name}", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        _MODULES[name] = module
    return _MODULES[name]


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    return {**os.environ, **(extra or {})}


def handle(request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    if op == "ping":
        with open("/proc/uptime") as f:
            return {"uptime": float(f.read().split()[0])}
    if op == "run":
        start = time.monotonic()
        try:
            done = subprocess.run(
                request["argv"],
                input=request.get("input"),
                capture_output=True,
                text=True,
                errors="replace",
                timeout=request.get("timeout", 300),
                env=_env(request.get("env")),
                cwd=request.get("cwd"),
                stdin=None if request.get("input") is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            return {
                "rc": -9,
                "timedOut": True,
                "stdout": _text(e.stdout),
                "stderr": _text(e.stderr),
                "seconds": time.monotonic() - start,
            }
        return {
            "rc": done.returncode,
            "stdout": done.stdout,
            "stderr": done.stderr,
            "seconds": time.monotonic() - start,
        }
    if op == "spawn":
        with open(request["log"], "ab") as log:
            process = subprocess.Popen(
                request["argv"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_env(request.get("env")),
                cwd=request.get("cwd"),
                start_new_session=True,
            )
        _SPAWNED[process.pid] = process
        return {"pid": process.pid}
    if op == "wait":
        try:
            return {"rc": _SPAWNED[request["pid"]].wait(request.get("seconds", 0))}
        except subprocess.TimeoutExpired:
            return {"rc": None}
    if op == "read":
        with open(request["path"], errors="replace") as f:
            return {"text": f.read()}
    if op == "write":
        with open(request["path"], "w") as f:
            f.write(request["text"])
        return {}
    if op == "call":
        function = getattr(_module(request["module"]), request["function"])
        return {"result": function(**request.get("kwargs", {}))}
    if op == "poweroff":
        return {}
    raise ValueError(f"unknown op {op!r}")


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def port_device(name: str) -> str:
    """/dev/vportNpM of the virtio-serial port NAME (no udev in the guest makes /dev/virtio-ports/NAME)."""
    deadline = time.monotonic() + 30
    while True:
        for entry in sorted(os.listdir("/sys/class/virtio-ports")) if os.path.isdir("/sys/class/virtio-ports") else []:
            with open(f"/sys/class/virtio-ports/{entry}/name") as f:
                if f.read().strip() == name:
                    return f"/dev/{entry}"
        if time.monotonic() > deadline:
            raise SystemExit(f"guest-agent: no virtio-serial port named {name}")
        time.sleep(0.1)


def serve(name: str) -> None:
    port = port_device(name)
    fd = os.open(port, os.O_RDWR)
    buffer = b""
    print(f"guest-agent: serving {port} ({name})", file=sys.stderr, flush=True)
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:  # the host is not connected (yet, or any more)
            time.sleep(0.05)
            continue
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if not line.strip():
                continue
            request: dict[str, Any] = {}
            try:
                request = json.loads(line)
                reply = {"id": request.get("id"), **handle(request)}
            except Exception as e:
                where = "".join(traceback.format_tb(e.__traceback__)[-3:])
                reply = {"id": request.get("id"), "error": f"{type(e).__name__}: {e}\n{where}"}
            data = (json.dumps(reply) + "\n").encode()
            while data:
                data = data[os.write(fd, data) :]
            if request.get("op") == "poweroff" and "error" not in reply:
                os.sync()
                with open("/proc/sysrq-trigger", "w") as f:
                    f.write("o")


if __name__ == "__main__":
    serve(sys.argv[1])
