"""Signed checkpoints: a manifest carries an HMAC-SHA256 of itself under a key only the run holds.

The per-file BLAKE2b digests in `manifest.json` catch corruption, but anyone who can write to the
store can also rewrite a digest. The signature closes that: it covers the whole manifest (every
file's size and digest), and its key is derived from the run's secret — the same 32 bytes that
authenticate keeper connections (`link.run_secret`: `PHALANX_RUN_SECRET`, `checkpoint.key_file`, or
`runs/NAME/.keeper-secret`) — which never goes to storage. A key id (a digest of the key, not the
key) names which key signed, so a refusal can say "another run's key" rather than "tampered".
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Optional

ALGORITHM = "hmac-sha256"


def signing_key(secret: bytes) -> bytes:
    """The manifest key of a run secret (a separate key, so a signature reveals nothing of the secret)."""
    return hmac.new(secret, b"phalanx checkpoint manifest v1", hashlib.sha256).digest()


def key_id(key: bytes) -> str:
    return hashlib.blake2b(key, digest_size=6, person=b"phalanx-keyid").hexdigest()


def mac(key: bytes, record: dict[str, Any], without: str) -> str:
    """HMAC-SHA256 of `record`'s canonical JSON, less its own `without` field (where the MAC is kept)."""
    body = json.dumps({k: v for k, v in record.items() if k != without}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def sign(manifest: dict[str, Any], key: bytes) -> dict[str, Any]:
    signature = {"alg": ALGORITHM, "key_id": key_id(key), "mac": mac(key, manifest, without="signature")}
    return {**manifest, "signature": signature}


def signature_problem(manifest: dict[str, Any], key: bytes, run_dir_hint: str = "RUN") -> Optional[str]:
    """Why `manifest` is not signed by `key` (None: it is)."""
    signature = manifest.get("signature")
    adopt = f"`phalanx ckpt verify {run_dir_hint} --step {manifest.get('step')} --trust`"
    if signature is None:
        return (f"it is not signed (written before phalanx signed checkpoints, or by another tool); if you trust "
                f"where it came from, adopt it with {adopt}, or resume with checkpoint.sign=false")
    if signature.get("alg") != ALGORITHM or not isinstance(signature.get("mac"), str):
        return f"its signature is not {ALGORITHM}"
    if signature.get("key_id") != key_id(key):
        return (f"it was signed with another key (key id {str(signature.get('key_id'))[:16]}, this run's is "
                f"{key_id(key)}): give this run that run's secret (PHALANX_RUN_SECRET or checkpoint.key_file), "
                f"or adopt it with {adopt}")
    if not hmac.compare_digest(mac(key, manifest, without="signature"), signature["mac"]):
        return "its signature does not verify: the manifest was changed after it was signed (tampered)"
    return None
