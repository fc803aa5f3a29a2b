"""Keeps the node's ResourceSlice pool on the API server equal to the device model.

Only the pool named after the node, of our driver, on our node is ever written. Every change to the pool bumps its
generation in all of its slices, because the scheduler uses only the slices of a pool's newest generation. Nothing is
written while the stored pool already says what the model says, so an idle driver costs the API server no writes.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Iterable
from typing import Any

from dra_cpu.core.devices import Device, DeviceConfig, build_slices
from dra_cpu.kube.api import ClusterAPI, ClusterError, Conflict, NotFound

Log = logging.Logger | logging.LoggerAdapter[logging.Logger]

# Seconds before the first retry and the most any retry waits.
RETRY_SECONDS = (0.5, 30.0)
# A reconcile (reads only, when nothing changed) even without watch events, in case one was missed.
RESYNC_SECONDS = 600.0
CONFLICT_ATTEMPTS = 5


class SlicePublisher:
    """Publishes the devices given to `set_devices` and keeps them published while `run` runs."""

    def __init__(
        self,
        api: ClusterAPI,
        config: DeviceConfig,
        log: Log,
        *,
        retry_seconds: tuple[float, float] = RETRY_SECONDS,
        resync_seconds: float = RESYNC_SECONDS,
    ) -> None:
        self._api = api
        self._config = config
        self._log = log
        self._retry_seconds = retry_seconds
        self._resync_seconds = resync_seconds
        self._random = random.Random()
        self._lock = threading.Lock()  # guards the devices and the counters
        self._sync_lock = threading.Lock()  # one reconcile at a time; guards _accepted
        self._wake = threading.Event()
        self._devices: tuple[Device, ...] | None = None
        # Per slice: (what we sent, what the server stored) for our last write, both as comparison keys. When the
        # server drops fields, the stored slice never equals the model; this pair tells that it is still current.
        self._accepted: dict[str, tuple[str, str]] = {}
        # Never publish a generation below one we published: when every slice was deleted (the kubelet does that
        # on restart), a cache somewhere may still hold the old ones.
        self._generation = 0
        self._writes = 0
        self._errors = 0
        self._dropped_field_warnings = 0

    @property
    def writes(self) -> int:
        """Creates, updates and deletes of slices since start."""
        with self._lock:
            return self._writes

    @property
    def errors(self) -> int:
        """Reconciles that failed (and were retried)."""
        with self._lock:
            return self._errors

    @property
    def dropped_field_warnings(self) -> int:
        """Slice writes after which the server had dropped fields we sent."""
        with self._lock:
            return self._dropped_field_warnings

    def set_devices(self, devices: Iterable[Device]) -> None:
        """The model to publish from now on; a running publisher publishes it at once."""
        with self._lock:
            self._devices = tuple(devices)
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Publishes, then republishes after every change to the pool by anyone and every `set_devices`, until
        `stop` is set. Failures are logged and retried with capped exponential backoff; nothing escapes."""
        watcher = threading.Thread(target=self._watch, args=(stop,), name="slice-watch", daemon=True)
        watcher.start()
        failures = 0
        while not stop.is_set():
            self._wake.clear()
            try:
                self.sync_once()
            except Exception as err:  # a bug or a malformed stored object must not stop publishing either
                failures += 1
                with self._lock:
                    self._errors += 1
                wait = self._retry_delay(failures)
                self._log.warning(
                    "publishing resourceslices failed; will retry",
                    extra={"error": str(err), "retryInSeconds": round(wait, 2), "failures": failures},
                    exc_info=not isinstance(err, ClusterError),
                )
            else:
                failures, wait = 0, self._resync_seconds
            self._wake.wait(wait)
        watcher.join()

    def _retry_delay(self, failures: int) -> float:
        first, cap = self._retry_seconds
        # Jitter spreads the retries of many nodes after an API server outage.
        return min(cap, first * 2.0 ** (failures - 1)) * self._random.uniform(0.5, 1.0)

    def _watch(self, stop: threading.Event) -> None:
        failures = 0
        try:
            while not stop.is_set():
                try:
                    for _ in self._api.watch_slices(self._config.driver_name, self._config.node_name, stop):
                        failures = 0
                        self._wake.set()
                except Exception as err:  # the loop in run() goes on meanwhile; keep watching
                    failures += 1
                    wait = self._retry_delay(failures)
                    self._log.warning(
                        "watching resourceslices failed; will retry",
                        extra={"error": str(err), "retryInSeconds": round(wait, 2)},
                        exc_info=not isinstance(err, ClusterError),
                    )
                    stop.wait(wait)
        finally:
            # The watch ends only when stop is set: wake run() so that it sees it.
            self._wake.set()

    def sync_once(self) -> int:
        """One reconcile of the pool against the model; returns the number of writes (0 when it was current)."""
        with self._lock:
            devices = self._devices
        if devices is None:
            return 0
        with self._sync_lock:
            for _ in range(CONFLICT_ATTEMPTS):
                try:
                    return self._reconcile(devices)
                except (Conflict, NotFound) as err:
                    # Someone wrote or deleted a slice between our read and our write.
                    self._log.info("resourceslice changed meanwhile; re-reading the pool", extra={"error": str(err)})
        raise ClusterError(
            f"resourceslice pool {self._config.node_name}: still conflicting after {CONFLICT_ATTEMPTS} attempts"
        )

    def _reconcile(self, devices: tuple[Device, ...]) -> int:
        config = self._config
        stored = {
            s["metadata"]["name"]: s
            for s in self._api.list_slices(config.driver_name, config.node_name)
            if s.get("spec", {}).get("pool", {}).get("name") == config.node_name
        }
        owner = self._owner()
        if self._current(build_slices(devices, config), stored, owner):
            return 0
        generation = max([self._generation, *(_generation(s) for s in stored.values())]) + 1
        wanted = build_slices(devices, config, generation)
        writes = 0
        for obj in wanted:
            before = stored.get(obj["metadata"]["name"])
            if owner is not None:
                obj["metadata"]["ownerReferences"] = [owner]
            if before is None:
                result = self._api.create_slice(obj)
            else:
                # Keep what others set (labels, finalizers); the resourceVersion makes the update a compare-and-swap.
                obj["metadata"] = {**before["metadata"], **obj["metadata"]}
                result = self._api.update_slice(obj)
            writes += self._count_write()
            self._check_stored(obj, result)
        names = {obj["metadata"]["name"] for obj in wanted}
        # Delete after writing the new generation, so that the pool is never left with fewer slices than it says.
        for name in sorted(stored.keys() - names):
            self._api.delete_slice(name)
            writes += self._count_write()
        self._accepted = {name: pair for name, pair in self._accepted.items() if name in names}
        self._generation = generation
        self._log.info(
            "published resourceslices",
            extra={
                "pool": config.node_name,
                "generation": generation,
                "slices": len(wanted),
                "devices": len(devices),
                "writes": writes,
            },
        )
        return writes

    def _count_write(self) -> int:
        with self._lock:
            self._writes += 1
        return 1

    def _owner(self) -> dict[str, Any] | None:
        """The Node as controller owner, so that the garbage collector removes the slices with the Node; read every
        time because a re-created Node has a new uid."""
        node = self._api.get_node(self._config.node_name)
        uid = (node or {}).get("metadata", {}).get("uid")
        if not uid:
            return None
        return {"apiVersion": "v1", "kind": "Node", "name": self._config.node_name, "uid": uid, "controller": True}

    def _current(
        self, wanted: list[dict[str, Any]], stored: dict[str, dict[str, Any]], owner: dict[str, Any] | None
    ) -> bool:
        """Whether the stored pool already publishes `wanted` (generation aside), consistently and owned."""
        if {obj["metadata"]["name"] for obj in wanted} != stored.keys():
            return False
        if len({_generation(s) for s in stored.values()}) != 1:
            return False
        for obj in wanted:
            name = obj["metadata"]["name"]
            have = stored[name]
            if owner is not None and owner not in (have["metadata"].get("ownerReferences") or []):
                return False
            want_key, have_key = _key(obj), _key(have)
            if want_key != have_key and self._accepted.get(name) != (want_key, have_key):
                return False
        return True

    def _check_stored(self, sent: dict[str, Any], stored: dict[str, Any]) -> None:
        """Reports fields the server dropped (a feature gate off, an older API version) from the write's result,
        which is the object as stored."""
        name = sent["metadata"]["name"]
        self._accepted[name] = (_key(sent), _key(stored))
        dropped = sorted(_dropped(sent.get("spec"), stored.get("spec"), "spec"))
        if not dropped:
            return
        with self._lock:
            self._dropped_field_warnings += 1
        gates = sorted({_GATES.get(path.rsplit(".", 1)[-1], "DRAConsumableCapacity") for path in dropped})
        self._log.warning(
            "the API server dropped fields of resourceslice %s: %s (is the %s feature gate off?)",
            name,
            ", ".join(dropped),
            " or ".join(gates),
            extra={"slice": name, "droppedFields": ",".join(dropped)},
        )


# The feature gate behind a device field the server may drop; any other dropped field: DRAConsumableCapacity's.
_GATES = {"nodeAllocatableResources": "DRANodeAllocatableResources"}


def _generation(obj: dict[str, Any]) -> int:
    value = obj.get("spec", {}).get("pool", {}).get("generation")
    return value if isinstance(value, int) else 0


def _key(obj: dict[str, Any]) -> str:
    """The meaningful content of a slice: its spec without the pool generation."""
    spec = obj.get("spec") or {}
    pool = {k: v for k, v in (spec.get("pool") or {}).items() if k != "generation"}
    return json.dumps({**spec, "pool": pool}, sort_keys=True)


def _dropped(sent: Any, stored: Any, path: str) -> set[str]:
    """Paths of the keys in `sent` that `stored` lacks; list positions read [*] so that one field reads once."""
    if isinstance(sent, dict) and isinstance(stored, dict):
        found: set[str] = set()
        for key, value in sent.items():
            here = f"{path}[{key}]" if "." in key or "/" in key else f"{path}.{key}"
            found |= {here} if key not in stored else _dropped(value, stored[key], here)
        return found
    if isinstance(sent, list) and isinstance(stored, list):
        return set().union(*(_dropped(a, b, f"{path}[*]") for a, b in zip(sent, stored, strict=False)))
    return set()
