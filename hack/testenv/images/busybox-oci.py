#!/usr/bin/env python3
"""Builds a one-layer busybox image as an OCI archive (importable by `ctr images import` and `podman load`).

No registry is reachable from the test machines, so the image is made from Debian's busybox-static. Its default
command sleeps until SIGTERM, which lets the same image serve as the CRI pause image. Every tar entry has fixed
metadata, so the same busybox binary always gives the same digests and a re-import is a no-op.

Usage: busybox-oci.py BUSYBOX_BINARY IMAGE_NAME OUTPUT_ARCHIVE
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
from pathlib import Path

# sh as PID 1 ignores SIGTERM unless trapped; `sleep & wait` lets the trap run at once instead of after the sleep.
SLEEPER = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait; done"]
# Mount points runc expects to exist, and /tmp for tests that write files.
DIRS = ["bin", "dev", "etc", "proc", "root", "sbin", "sys", "tmp", "usr", "usr/bin", "usr/sbin", "var", "run"]
GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


def _entry(name: str, kind: bytes, mode: int, **extra: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 0
    for key, value in extra.items():
        setattr(info, key, value)
    return info


def rootfs_layer(busybox: Path) -> bytes:
    """The rootfs as an uncompressed tar: the binary, a symlink per applet, a few directories and files."""
    applets = subprocess.run([busybox, "--list-full"], check=True, capture_output=True, text=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in DIRS:
            tar.addfile(_entry(d, tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755))
        data = busybox.read_bytes()
        tar.addfile(_entry("bin/busybox", tarfile.REGTYPE, 0o755, size=len(data)), io.BytesIO(data))
        for applet in sorted(set(applets)):
            if applet != "bin/busybox" and applet.split("/")[0] in ("bin", "sbin", "usr"):
                tar.addfile(_entry(applet, tarfile.SYMTYPE, 0o777, linkname="/bin/busybox"))
        for name, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"), ("etc/group", "root:x:0:\n")):
            raw = text.encode()
            tar.addfile(_entry(name, tarfile.REGTYPE, 0o644, size=len(raw)), io.BytesIO(raw))
    return buf.getvalue()


def _blob(tar: tarfile.TarFile, media_type: str, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    tar.addfile(_entry(f"blobs/sha256/{digest}", tarfile.REGTYPE, 0o644, size=len(data)), io.BytesIO(data))
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_archive(layer: bytes, image_name: str, out: Path) -> None:
    arch = GOARCH.get(platform.machine(), platform.machine())
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": SLEEPER, "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer).hexdigest()}"]},
    }
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_entry("blobs", tarfile.DIRTYPE, 0o755))
        tar.addfile(_entry("blobs/sha256", tarfile.DIRTYPE, 0o755))
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": _blob(tar, "application/vnd.oci.image.config.v1+json", _json(config)),
            "layers": [_blob(tar, "application/vnd.oci.image.layer.v1.tar", layer)],
        }
        descriptor = _blob(tar, "application/vnd.oci.image.manifest.v1+json", _json(manifest))
        # containerd names the image after io.containerd.image.name; podman after ref.name.
        names = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
        descriptor["annotations"] = dict.fromkeys(names, image_name)
        descriptor["platform"] = {"architecture": arch, "os": "linux"}
        for name, data in (
            ("oci-layout", _json({"imageLayoutVersion": "1.0.0"})),
            ("index.json", _json({"schemaVersion": 2, "manifests": [descriptor]})),
        ):
            tar.addfile(_entry(name, tarfile.REGTYPE, 0o644, size=len(data)), io.BytesIO(data))
    tmp.replace(out)


def main() -> None:
    busybox, image_name, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    write_archive(rootfs_layer(busybox), image_name, out)


if __name__ == "__main__":
    main()
