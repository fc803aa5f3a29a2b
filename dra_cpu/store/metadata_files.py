"""The device metadata files of prepared claims and the CDI specs that mount them (core/device_metadata.py says
what they hold and where they go, core/desired.py which there should be): written, removed, and swept of what no
prepared claim has, as reconciler.py says.

Neither the file nor its spec is written durably (no fsync of the file or its folders): a write is lost only by a
power loss or kernel crash, that is a reboot, and after a reboot every pod gets a new sandbox, before which the
kubelet prepares the pod's claims again (a claim it loads from its own checkpoint counts as not prepared), which
rewrites the file and the spec from the claim on the API server. Before that, start-up makes what it finds agree
with the durable checkpoint: the file of a claim not prepared goes, a half-written one too, and a file kept gets its
spec back. A durable write would cost each prepare an fdatasync and an fsync of the folder:
milliseconds on a busy disk, for files the next prepare rewrites anyway.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any

from dra_cpu.core import device_metadata as dm
from dra_cpu.core.cdi_spec import CDI_VERSION
from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.desired import MetadataFile
from dra_cpu.core.device_metadata import MetadataError, RequestMetadata
from dra_cpu.core.ledger import ClaimMetadata
from dra_cpu.store.fileio import read_file, remove_file, write_atomic
from dra_cpu.store.leftovers import remove_temp_files

DIR_MODE = 0o755
FILE_MODE = 0o644
_UUID_LENGTH = 36
# The file's name in the kubeletplugin helper's layout, which an earlier dra-cpu wrote (move_helper_layout).
HELPER_LAYOUT_FILE = "metadata.json"


def encode(request: RequestMetadata, versions: Iterable[str] = dm.VERSIONS) -> bytes:
    """The file: one pretty-printed object per API version, newest first, each followed by a newline, as the
    kubeletplugin helper writes it. The objects differ in their apiVersion alone: the first is encoded (pretty
    printing runs in Python, not in the json module's C code) and the others are copies with that line changed."""
    first, *others = versions
    text = pretty_json(dm.document(request, first)) + "\n"
    line = f'"apiVersion": "{dm.GROUP}/{first}"'
    return "".join([text, *(text.replace(line, f'"apiVersion": "{dm.GROUP}/{v}"', 1) for v in others)]).encode()


def pretty_json(value: Any, indent: str = "\n") -> str:
    """json.dumps(value, indent=2) for JSON values with string keys, byte for byte, in half its time: the json
    module's Python encoder makes a generator per container and value, this one string joins."""
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    inner = indent + "  "
    if isinstance(value, dict):
        items = [f"{inner}{encode_basestring_ascii(k)}: {pretty_json(v, inner)}" for k, v in value.items()]
        return "{" + ",".join(items) + indent + "}" if items else "{}"
    if isinstance(value, list | tuple):
        return "[" + ",".join([inner + pretty_json(v, inner) for v in value]) + indent + "]" if value else "[]"
    if value is True or value is False or value is None:
        return "true" if value else "false" if value is False else "null"
    if type(value) is int:
        return int.__repr__(value)  # as the json module writes an int; a subclass's repr may differ
    return json.dumps(value)


def decode(data: bytes, versions: Iterable[str] = dm.VERSIONS, validate: bool = True) -> dict[str, Any]:
    """The first object of the stream whose apiVersion is one of `versions`, checked by the format's rules unless
    `validate` is off, as k8s.io/dynamic-resource-allocation/devicemetadata decodes: objects of other versions of
    the group are skipped; anything else is a MetadataError naming the problem."""
    known = tuple(versions)
    try:
        text = data.decode()
    except UnicodeDecodeError as err:
        raise MetadataError(f"device metadata is not UTF-8: {err}") from None
    decoder = json.JSONDecoder()
    position, unknown = 0, []
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position == len(text):
            break
        try:
            obj, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as err:
            raise MetadataError(f"device metadata stream: {err}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("apiVersion"), str):
            raise MetadataError("device metadata stream: an object without apiVersion")
        group, _, version = obj["apiVersion"].rpartition("/")
        if group != dm.GROUP or obj.get("kind") != dm.KIND:
            raise MetadataError(f"device metadata stream: {obj['apiVersion']} {obj.get('kind')} is not {dm.GROUP}")
        if version not in known:
            unknown.append(obj["apiVersion"])
            continue
        if validate:
            dm.check(obj)
        return obj
    if not unknown:
        raise MetadataError("no metadata objects found in stream")
    raise MetadataError(f"no compatible metadata version found in stream (unknown versions: {', '.join(unknown)})")


@dataclass(frozen=True)
class MetadataStore:
    """Our metadata files, `<plugin_dir>/dra-device-metadata/<claimUID>_<request>.json`, and our `<driver>_metadata_*`
    CDI specs; what they should be is core/desired.py's (ClaimFiles.metadata), reconciler.py says when."""

    plugin_dir: Path
    cdi_root: Path
    driver: str

    @cached_property
    def root(self) -> Path:
        return self.plugin_dir / dm.HOST_SUBDIR

    def host_file(self, uid: str, request: str) -> Path:
        return Path(self._host_file(uid, request))

    def spec_path(self, uid: str, request: str) -> Path:
        return Path(self._spec_file(uid, request))

    # The same paths as text, as prepare and unprepare use them (fileio.write_atomic says why).
    def _host_file(self, uid: str, request: str) -> str:
        return f"{self.root}/{dm.host_file_name(uid, request)}"

    def _spec_file(self, uid: str, request: str) -> str:
        return f"{self.cdi_root}/{dm.cdi_spec_filename(self.driver, uid, request)}"

    def write(self, files: Iterable[MetadataFile], fresh: bool = False) -> dict[str, str]:
        """Write each request's file and CDI spec, only what differs from what is there (a file `as_found` is left
        as it is, and gets its spec only when it is there); base request name -> the CDI device id that mounts
        it, for those in place. `fresh`: the claim is new to the ledger, so nothing is read back before writing
        (cdi_files.CDIStore.ensure says why)."""
        ids = {}
        for file in files:
            request = file.request
            path = self._host_file(request.ref.uid, request.base_request)
            if file.as_found:
                if self._uid_in(path) != request.ref.uid:
                    continue
            else:
                self._write(path, encode(request), fresh)
            self._write_spec(request, path, fresh)
            ids[request.base_request] = dm.cdi_device_id(self.driver, request.ref.uid, request.base_request)
        return ids

    def remove(self, ref: ClaimRef, requests: Iterable[str] | None = None) -> None:
        """Remove a claim's files and specs: those of `requests` (base request names) when its record names them,
        else every one found (both folders listed)."""
        try:
            paths: list[str | Path]
            if requests is None:
                paths = [*self._specs(ref.uid), *self._files(ref.uid)]
            else:
                named = list(requests)
                paths = [
                    *(self._spec_file(ref.uid, request) for request in named),
                    *(self._host_file(ref.uid, request) for request in named),
                ]
            for path in paths:
                remove_file(path)
        except OSError as err:
            raise MetadataError(
                f"cannot remove device metadata of claim {ref}: {err.filename}: {err.strerror}"
            ) from None

    # --- start-up -------------------------------------------------------------------------------------------

    def move_helper_layout(self) -> list[str]:
        """Move the files an earlier dra-cpu wrote in the kubeletplugin helper's layout,
        `<namespace>_<claim>/<request>/metadata.json`, to ours, and remove those folders. A rename keeps the file's
        inode, which the bind mounts of running containers hold; the CDI spec is rewritten to the new path by the
        write that start-up makes for every prepared claim, and what no prepared claim has goes with the rest
        (remove_all_but). Returns what it did, one line each."""
        done: list[str] = []
        try:
            folders = (
                [p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()] if self.root.is_dir() else []
            )
            for claim_dir in sorted(folders):
                for request_dir in sorted(claim_dir.iterdir()):
                    # A link is not followed: only what lies in our own folders is moved into the flat one.
                    uid = None if request_dir.is_symlink() else self._uid_in(request_dir / HELPER_LAYOUT_FILE)
                    target = self.host_file(uid, request_dir.name) if uid is not None else None
                    if target is not None and not target.exists():
                        os.rename(request_dir / HELPER_LAYOUT_FILE, target)
                        done.append(f"moved {request_dir / HELPER_LAYOUT_FILE} to {target}")
                shutil.rmtree(claim_dir)
                done.append(f"removed {claim_dir}: the earlier layout's folder")
        except OSError as err:
            raise MetadataError(f"cannot move device metadata: {err.filename}: {err.strerror}") from None
        return done

    def recorded(self, ref: ClaimRef) -> ClaimMetadata | None:
        """What the files of a claim name, read back from them (for a claim whose record does not say: loaded from
        a version 1 checkpoint, or rebuilt from its CDI spec); None when it has none that are ours and readable."""
        found: dict[str, str | None] = {}
        try:
            paths = self._files(ref.uid)
        except OSError:
            return None
        for path in paths:
            request = self._request_in(path, ref.uid)
            if request is not None:
                found[request.name] = request.pod_claim_name
        if not found:
            return None
        return ClaimMetadata(next(iter(found.values())), tuple(sorted(found)))

    def remove_all_but(self, keep: Iterable[MetadataFile]) -> list[str]:
        """Remove every file and spec of ours that is not one of `keep` (files of claims no longer prepared,
        specs without a file), and the temp files of interrupted writes. Returns what it did, one line each."""
        wanted = {(f.request.ref.uid, f.request.base_request) for f in keep}
        done: list[str] = []
        try:
            done += [f"removed temp file {p}" for p in self._remove_leftovers()]
            for path in sorted(self.root.iterdir()) if self.root.is_dir() else []:
                key = dm.host_file_key(path.name)
                if key not in wanted or self._request_in(path, key[0]) is None:
                    _remove_path(path)
                    done.append(f"removed {path}: its claim is not prepared")
            for spec in self._specs():
                if self._spec_key(spec.name) not in wanted:
                    spec.unlink(missing_ok=True)
                    done.append(f"removed CDI spec {spec}: no prepared claim's metadata file")
        except OSError as err:
            raise MetadataError(f"cannot reconcile device metadata: {err.filename}: {err.strerror}") from None
        return done

    def _request_in(self, path: Path, uid: str) -> RequestMetadata | None:
        """The request a file is for when the file is ours, readable, of claim `uid` and of the request its name
        says; else None."""
        if path.is_symlink() or dm.host_file_key(path.name) is None:
            return None
        try:
            doc = decode(path.read_bytes())
        except (OSError, MetadataError):
            return None
        meta = doc.get("metadata") or {}
        requests = doc.get("requests") or []
        if str(meta.get("uid")) != uid or len(requests) != 1:
            return None
        name = str(requests[0]["name"])
        if dm.host_file_name(uid, name.split("/", 1)[0]) != path.name:
            return None
        ref = ClaimRef(str(meta.get("namespace")), str(meta.get("name")), uid)
        return RequestMetadata(ref, doc.get("podClaimName"), name, ())

    # --- files ----------------------------------------------------------------------------------------------

    def _write_spec(self, request: RequestMetadata, host_path: str, fresh: bool = False) -> bool:
        spec = dm.cdi_spec(self.driver, request, host_path, CDI_VERSION)
        data = json.dumps(spec).encode() + b"\n"  # on one line, as the claim's CDI spec (cdi_files.py)
        return self._write(self._spec_file(request.ref.uid, request.base_request), data, fresh)

    @staticmethod
    def _write(path: str, data: bytes, fresh: bool = False) -> bool:
        """Write `data` unless the file already holds exactly it (a kubelet retry on a full or read-only folder
        then succeeds), or at once when `fresh`; True when written."""
        if not fresh:
            try:
                if read_file(path) == data:
                    return False
            except OSError:
                pass
        try:
            # Not durable: see the module's docstring.
            write_atomic(path, data, mode=FILE_MODE, durable=False, folder_mode=DIR_MODE)
        except OSError as err:
            raise MetadataError(f"cannot write device metadata {path}: {err.strerror}") from None
        return True

    def _files(self, uid: str) -> list[Path]:
        """The claim's files, found by listing the folder."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if (key := dm.host_file_key(p.name)) is not None and key[0] == uid)

    def _specs(self, uid: str = "") -> list[Path]:
        prefix = dm.cdi_spec_prefix(self.driver, uid)
        if not self.cdi_root.is_dir():
            return []
        return sorted(p for p in self.cdi_root.iterdir() if p.name.startswith(prefix) and p.name.endswith(".json"))

    def _spec_key(self, name: str) -> tuple[str, str]:
        rest = name[len(dm.cdi_spec_prefix(self.driver)) : -len(".json")]
        return rest[:_UUID_LENGTH], rest[_UUID_LENGTH + 1 :]

    @staticmethod
    def _uid_in(path: str | Path) -> str | None:
        try:
            # Only whose it is matters here, not whether a reader would accept it.
            uid = (decode(read_file(path), validate=False).get("metadata") or {}).get("uid")
        except (OSError, MetadataError):
            return None
        return uid if isinstance(uid, str) and uid else None

    def _remove_leftovers(self) -> list[Path]:
        return [
            *remove_temp_files(self.cdi_root, f"{dm.cdi_spec_prefix(self.driver)}*.json"),
            *remove_temp_files(self.root, "*.json"),
        ]


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
