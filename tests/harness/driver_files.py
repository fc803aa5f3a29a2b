"""What the driver wrote on a node, read back: the claims of its checkpoint, and the claims its CDI specs are for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.harness.claims import DRIVER


def checkpoint_records(text: str) -> dict[str, dict[str, Any]]:
    """Claim UID -> record, from the text of a checkpoint (checkpoint.json)."""
    return {str(c["uid"]): c for c in json.loads(text).get("claims", [])}


def checkpoint_claims(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Claim UID -> record, from the driver's checkpoint on the host."""
    path = state_dir / "checkpoint.json"
    return checkpoint_records(path.read_text()) if path.exists() else {}


CDI_SPEC_PREFIX = f"{DRIVER}-cpu_claim-"


def cdi_spec_uids(cdi_dir: Path) -> set[str]:
    """Claim UIDs of the driver's CDI specs on the host."""
    return {
        p.name.removeprefix(CDI_SPEC_PREFIX).removesuffix(".json") for p in cdi_dir.glob(f"{CDI_SPEC_PREFIX}*.json")
    }


def cdi_spec_env(cdi_dir: Path, uid: str) -> dict[str, str]:
    """The variables the driver's CDI spec of claim `uid` gives its containers."""
    spec = json.loads((cdi_dir / f"{CDI_SPEC_PREFIX}{uid}.json").read_text())
    return dict(e.split("=", 1) for device in spec["devices"] for e in device["containerEdits"].get("env", []))
