#!/usr/bin/env python3
"""Check a medcollab audit inclusion proof with nothing but the Python standard library.

Usage::

    medcollab audit proof --event 42 > proof.json
    python3 tools/verify_proof.py proof.json                      # against the checkpoint inside
    python3 tools/verify_proof.py proof.json --checkpoint cp.txt  # against one kept elsewhere

What it checks, without trusting medcollab's code:

1. the leaf hash is ``SHA-256(0x00 || entry)`` of the event's canonical JSON (RFC 6962), and the
   entry names the sequence number the proof claims;
2. the checkpoint (the one in the proof, or better, one obtained independently, e.g. from a witness)
   is well formed, its tree size is the proof's, and its root hash is the proof's;
3. the audit path leads from the leaf to that root (RFC 9162 section 2.1.3.2).

What it does NOT check: the checkpoint's Ed25519 signature. The standard library has no Ed25519, so
the signature needs the log's public key (its note verifier key, printed by
``medcollab audit checkpoint``) and a library or tool that implements C2SP signed notes, e.g. Go's
``golang.org/x/mod/sumdb/note`` or any witness. Without that step the proof shows only that the
event is in *some* tree with this root; with it, that it is in the tree the log signed.

Exit status: 0 if the proof holds, 1 if it does not, 2 if the input cannot be read.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import sys
from pathlib import Path
from typing import Any

FORMAT = "medcollab-audit-inclusion-proof/v1"
HASH_SIZE = 32


class ProofError(Exception):
    """The proof does not hold."""


class InputError(Exception):
    """The input cannot be read as a proof or a checkpoint."""


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise InputError(f"{what} is not a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise InputError(f"{what} is not valid base64") from None
    if len(raw) != HASH_SIZE:
        raise InputError(f"{what} is {len(raw)} bytes, not {HASH_SIZE}")
    return raw


def parse_checkpoint(note: str) -> tuple[str, int, bytes]:
    """Origin, tree size and root hash of a C2SP checkpoint (its signature is not checked)."""
    text, sep, _signatures = note.rpartition("\n\n")
    if not sep:
        raise InputError("the checkpoint has no blank line before its signatures")
    lines = text.split("\n")
    if len(lines) < 3 or not lines[0]:
        raise InputError("the checkpoint needs an origin, a tree size and a root hash")
    origin, size_text, root_text = lines[0], lines[1], lines[2]
    if not size_text.isascii() or not size_text.isdigit() or size_text != str(int(size_text)):
        raise InputError(f"tree size {size_text!r} is not a decimal number")
    return origin, int(size_text), _b64(root_text, "the checkpoint's root hash")


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def verify_inclusion(leaf: bytes, index: int, size: int, path: list[bytes], root: bytes) -> None:
    """RFC 9162 section 2.1.3.2; raises :class:`ProofError` unless the path leads to ``root``."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not inside a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise ProofError("the audit path is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = _node(p, r)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the audit path is shorter than the tree is deep")
    if not hmac.compare_digest(r, root):
        raise ProofError("the audit path does not lead to the checkpoint's root hash")


def check(proof: Any, checkpoint_note: str | None) -> str:
    """Check ``proof``; returns a one-line summary or raises :class:`ProofError`/:class:`InputError`."""
    if not isinstance(proof, dict) or proof.get("format") != FORMAT:
        raise InputError(f"not a {FORMAT} document")
    try:
        seq, index, size = int(proof["seq"]), int(proof["leaf_index"]), int(proof["tree_size"])
        # A patient's access-history proof withholds the entry (it names the clinician's address
        # and, for searches, other patients); the leaf hash then stands for it.
        entry = str(proof["entry"]).encode("utf-8") if "entry" in proof else None
        path = [_b64(h, "an audit path element") for h in proof["inclusion_path"]]
        claimed_leaf = _b64(proof["leaf_hash"], "the leaf hash")
        claimed_root = _b64(proof["root_hash"], "the root hash")
        note = checkpoint_note if checkpoint_note is not None else str(proof["checkpoint"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"the proof is missing or mangles a field ({exc})") from None

    leaf = claimed_leaf
    if entry is not None:
        leaf = hashlib.sha256(b"\x00" + entry).digest()
        if not hmac.compare_digest(leaf, claimed_leaf):
            raise ProofError("the leaf hash is not SHA-256(0x00 || entry)")
        try:
            entry_seq = json.loads(entry)["seq"]
        except (ValueError, KeyError, TypeError):
            raise ProofError("the entry is not an audit leaf (JSON with a seq)") from None
        if entry_seq != seq:
            raise ProofError(f"the entry is for seq {entry_seq}, not seq {seq}")

    origin, cp_size, cp_root = parse_checkpoint(note)
    if cp_size != size:
        raise ProofError(
            f"the checkpoint covers {cp_size} events but the proof is for a tree of {size}; "
            "ask for a proof against this checkpoint's size"
        )
    if not hmac.compare_digest(cp_root, claimed_root):
        raise ProofError("the proof's root hash is not the checkpoint's")
    verify_inclusion(leaf, index, size, path, cp_root)
    withheld = "" if entry is not None else " (entry withheld; its leaf hash was checked)"
    return f"OK: seq {seq} is leaf {index} of the {size}-event tree of {origin}{withheld}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "proof",
        type=Path,
        help="JSON from `medcollab audit proof --event SEQ`, or one entry's `proof` from "
        "GET /me/access-history",
    )
    parser.add_argument(
        "--checkpoint", type=Path, help="a checkpoint obtained independently (recommended)"
    )
    args = parser.parse_args(argv)
    try:
        proof = json.loads(args.proof.read_text(encoding="utf-8"))
        note = args.checkpoint.read_text(encoding="utf-8") if args.checkpoint else None
        summary = check(proof, note)
    except (OSError, ValueError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ProofError as exc:
        print(f"FAILED: {exc}")
        return 1
    print(summary)
    print(
        "NOTE: the checkpoint's Ed25519 signature was not checked (the standard library has no "
        "Ed25519); check it with the log's verifier key and a C2SP signed-note implementation."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
