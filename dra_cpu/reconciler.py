"""The one place that makes the node match the ledger: the checkpoint, the CDI specs, the device metadata files and
the pins. core/desired.py says what the node should have; the Reconciler applies the difference from what is
there, in one order, with rollback:

1. remove what the new ledger no longer has: the claim's CDI spec, then its metadata files and their specs, so that
   no spec can point at CPUs the ledger may give another claim;
2. save the checkpoint, when the ledger changed: the truth a restarted driver trusts;
3. write what the new ledger has: the claim's CDI spec, then its metadata files and their specs (each only when it
   differs from what is there, so that a kubelet's retry succeeds on a full or read-only folder);
4. hand enforcement the new pins (it never blocks on the runtime).

A failure undoes the earlier steps and fails the operation, with one exception: metadata files that cannot be
written leave the claim prepared without them (logged; the kubelet's answer then names no metadata device), as the
kubeletplugin helper does. A crash between two steps leaves a state the next start repairs: a checkpoint that lists
a claim whose spec is missing (its spec is written again), never a spec whose claim the checkpoint lacks.

After a decision (`reconcile`) the difference is that of the one claim the decision touched; at start (`recover`)
it is that of the whole node, after the checks start-up needs: temp files of interrupted writes, a checkpoint that
cannot be trusted (rebuilt from the CDI specs), restore() against the node as discovered now, and metadata names
recorded nowhere but in the files (claims loaded from a version 1 checkpoint or rebuilt from their CDI specs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from dra_cpu.core import cdi_spec
from dra_cpu.core.cdi_spec import CDIError
from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.desired import ClaimFiles, claim_files, pins
from dra_cpu.core.device_metadata import MetadataError
from dra_cpu.core.entitlement import Pools
from dra_cpu.core.ledger import Ledger, PreparedClaim, restore
from dra_cpu.core.node_view import NodeView
from dra_cpu.errors import DraCpuError
from dra_cpu.logs import OperationLog, operation
from dra_cpu.store.cdi_files import CDIStore
from dra_cpu.store.checkpoint import VERSION, Checkpoint, CheckpointError, CheckpointFile
from dra_cpu.store.metadata_files import MetadataStore

LOG = logging.getLogger("dra_cpu.reconciler")


class Enforcer(Protocol):
    """What keeps the pins true in running containers (the NRI plugin); None in `--enforcement none`."""

    def check_ready(self) -> None:
        """Raise a DraCpuError (retriable) when enforcement is down and prepares must wait."""

    def set_pools(self, pools: Pools) -> None:
        """The pins changed: shrink or regrow the shared pool (never blocks on the runtime)."""


@dataclass
class Reconciler:
    checkpoint: CheckpointFile
    cdi: CDIStore
    metadata: MetadataStore
    boot_id: str
    enforcer: Enforcer | None = None

    # --- after a decision -----------------------------------------------------------------------------------

    def check_ready(self) -> None:
        if self.enforcer is not None:
            self.enforcer.check_ready()

    def reconcile(self, old: Ledger, new: Ledger, view: NodeView, ref: ClaimRef, log: OperationLog) -> dict[str, str]:
        """Make the part of the node that belongs to the claim `ref` match `new`, the ledger having been `old` (the
        two differ in that claim's entries only); DraCpuError, with everything undone, when it cannot. Returns the
        claim's metadata CDI ids in place, by base request name."""
        before, after = old.claims.get(ref.uid), new.claims.get(ref.uid)
        # Compared by this claim's entries alone: a prepare must not cost a comparison of the whole node's.
        changed = before != after or old.unrestorable.get(ref.uid) != new.unrestorable.get(ref.uid)
        if after is None:
            self._remove(ref, before, view, log)
            if changed:
                try:
                    self._save(new)
                except DraCpuError:
                    self._put_back(before, view, log)
                    raise
                self._pin(new, view)
            return {}
        if changed:
            self._save(new)
        # Nothing of a claim that stays prepared is removed: once recorded, its metadata requests never change.
        files = claim_files(after, view)
        fresh = before is None
        try:
            self.cdi.ensure(after.uid, files.cdi_spec, fresh)
        except CDIError:
            if changed:
                self._save_back(old, log)
            raise
        ids = self._write_metadata(files, log, fresh)
        if changed:
            self._pin(new, view)
        return ids

    def attach(self, enforcer: Enforcer, ledger: Ledger, view: NodeView) -> None:
        self.enforcer = enforcer
        self._pin(ledger, view)

    def repin(self, ledger: Ledger, view: NodeView) -> None:
        """The view changed (re-discovery): the pins follow. Files are not rewritten: a claim's spec names its
        CPUs and their memory nodes, which a topology change does not move."""
        self._pin(ledger, view)

    def _remove(self, ref: ClaimRef, before: PreparedClaim | None, view: NodeView, log: OperationLog) -> None:
        self.cdi.remove(ref.uid)
        recorded = before.metadata if before is not None else None
        try:
            self.metadata.remove(ref, recorded.base_requests if recorded is not None else None)
        except MetadataError:
            self._put_back(before, view, log)
            raise

    def _put_back(self, claim: PreparedClaim | None, view: NodeView, log: OperationLog) -> None:
        """The claim stays prepared: so do its files, until a retry succeeds."""
        if claim is None:
            return
        files = claim_files(claim, view)
        try:
            self.cdi.write(claim.uid, files.cdi_spec)
        except CDIError as err:
            # Safe either way: a missing spec points at nothing; start-up and a repeated prepare rewrite it.
            log.error("could not restore the CDI spec of a claim still prepared", extra={"reason": str(err)})
        self._write_metadata(files, log)

    def _save(self, ledger: Ledger) -> None:
        try:
            self.checkpoint.save(Checkpoint(ledger, self.boot_id))
        except OSError as err:
            raise DraCpuError(f"cannot write checkpoint {self.checkpoint.path}: {err.strerror}") from None

    def _save_back(self, old: Ledger, log: OperationLog) -> None:
        try:
            self._save(old)
        except DraCpuError as err:
            # The checkpoint now lists a claim without a spec: start-up rewrites the spec, and the kubelet's
            # retry of this prepare returns the same CPUs, so nothing is lost.
            log.error("rollback of the checkpoint failed", extra={"reason": str(err)})

    def _write_metadata(self, files: ClaimFiles, log: OperationLog, fresh: bool = False) -> dict[str, str]:
        """The soft step: metadata CDI ids by base request name, empty when they could not be written."""
        try:
            if files.metadata_problem:
                raise MetadataError(files.metadata_problem)
            return self.metadata.write(files.metadata, fresh)
        except MetadataError as err:
            log.error(
                "device metadata not written: the claim's containers start without the metadata file",
                extra={"reason": str(err)},
            )
            return {}

    def _pin(self, ledger: Ledger, view: NodeView) -> None:
        if self.enforcer is not None:
            self.enforcer.set_pools(pins(ledger, view))

    # --- at start -------------------------------------------------------------------------------------------

    def recover(self, view: NodeView) -> Ledger:
        """Load the ledger (or rebuild it from our CDI specs), check it against this node (restore()), and make the
        whole node match it. Claims the node cannot honour are reported, never fatal."""
        log = operation(LOG, "start")
        self._clean_up_leftovers(log)
        loaded = self._load(view, log)
        ledger = restore(
            loaded.ledger.claims.values(), view.topology, view.memory_capacity, loaded.ledger.unrestorable.values()
        )
        for uid, lost in ledger.unrestorable.items():
            if uid not in loaded.ledger.unrestorable:
                log.error(
                    "claim cannot be restored on this node: it is dropped and its prepares are refused",
                    extra={"claimUID": uid, "claim": str(lost.ref), "reason": lost.reason},
                )
        _tidy_metadata(
            self.metadata.move_helper_layout,
            "device metadata moved to this version's layout",
            "device metadata of the earlier layout could not be moved",
            log,
        )
        ledger = self._adopt_metadata(ledger, log)
        files = {uid: claim_files(claim, view) for uid, claim in ledger.claims.items()}
        for uid in sorted(set(self.cdi.uids()) - set(files)):
            log.info("removing orphaned CDI spec", extra={"claimUID": uid})
            self.cdi.remove(uid)
        _tidy_metadata(
            lambda: self.metadata.remove_all_but(m for f in files.values() for m in f.metadata),
            "device metadata made to agree with the prepared claims",
            "device metadata could not be reconciled with the prepared claims",
            log,
        )
        self._save(ledger)
        for uid, claim_file in files.items():
            self.cdi.ensure(uid, claim_file.cdi_spec)
            self._write_metadata(claim_file, log.bind(claimUID=uid))
        log.info(
            "state loaded",
            extra={
                "claims": len(ledger.claims),
                "allocated": str(ledger.allocated_cpus),
                "unrestorable": len(ledger.unrestorable),
            },
        )
        return ledger

    def _clean_up_leftovers(self, log: OperationLog) -> None:
        """Make the state folder ours alone (0700) and remove the temp files of writes a kill interrupted."""
        try:
            self.checkpoint.secure()
            removed = [*self.checkpoint.remove_leftovers(), *self.cdi.remove_leftovers()]
        except OSError as err:
            raise DraCpuError(f"cannot clean up {err.filename}: {err.strerror}") from None
        for path in removed:
            log.info("removed the temp file of an interrupted write", extra={"path": str(path)})

    def _load(self, view: NodeView, log: OperationLog) -> Checkpoint:
        try:
            loaded = self.checkpoint.load()
        except CheckpointError as err:
            if err.spare is not None and err.spare.boot_id != self.boot_id:
                # Torn by a save's write when a power loss had undone the swap of the save before, which the spare
                # holds: the newest save the kubelet was told of (store/checkpoint.py). CDI specs on a tmpfs such
                # as /var/run/cdi went with the reboot.
                log.error(
                    "checkpoint is corrupt and the node rebooted since: loading the save its spare holds",
                    extra={"reason": str(err), "sequence": err.spare.sequence},
                )
                loaded = err.spare
            else:
                # Within one boot nothing of ours tears checkpoint.json, and the spare may be a save behind the
                # CDI specs.
                log.error(
                    "checkpoint is corrupt; rebuilding the prepared claims from CDI specs",
                    extra={"reason": str(err)},
                )
                return Checkpoint(self._rebuilt(view, log), boot_id="")
        if loaded is None:
            return Checkpoint(Ledger(), self.boot_id)
        if loaded.boot_id and loaded.boot_id != self.boot_id:
            log.info(
                "node rebooted since the checkpoint: rewriting CDI specs", extra={"claims": len(loaded.ledger.claims)}
            )
        if loaded.version != VERSION:
            log.info(
                "checkpoint of an earlier version: it is written again as the current one",
                extra={"from": loaded.version, "to": VERSION},
            )
        return loaded

    def _rebuilt(self, view: NodeView, log: OperationLog) -> Ledger:
        claims = {}
        for uid in self.cdi.uids():
            try:
                env = cdi_spec.env_of_spec(self.cdi.read(uid))
                claims[uid] = cdi_spec.claim_from_env(env, uid, view.settings.pool)
            except CDIError as err:
                log.error("CDI spec unreadable: its claim is not restored", extra={"claimUID": uid, "reason": str(err)})
        return Ledger(claims)

    def _adopt_metadata(self, ledger: Ledger, log: OperationLog) -> Ledger:
        """Claims whose record does not say what their metadata files name take it from the files found."""
        adopted: Mapping[str, PreparedClaim] = {
            uid: replace(claim, metadata=found)
            for uid, claim in ledger.claims.items()
            if claim.metadata is None and (found := self.metadata.recorded(claim.ref)) is not None
        }
        for uid in adopted:
            log.info("device metadata files adopted from the disk", extra={"claimUID": uid})
        return replace(ledger, claims={**ledger.claims, **adopted}) if adopted else ledger


def _tidy_metadata(step: Callable[[], list[str]], done: str, failed: str, log: OperationLog) -> None:
    """A start-up step over the metadata files, each thing it did logged as `done`. Its failure is logged as `failed`
    and is not fatal: what a move left is removed by the sweep after it, prepares rewrite what they need, and
    unprepares remove what is theirs."""
    try:
        for action in step():
            log.info(done, extra={"action": action})
    except MetadataError as err:
        log.error(failed, extra={"reason": str(err)})
