"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and proof verification.

Hashes follow RFC 6962 section 2.1 exactly, so any Certificate Transparency or C2SP tooling can check
our proofs: ``leaf = SHA-256(0x00 || entry)``, ``node = SHA-256(0x01 || left || right)``, and the
root of the empty tree is ``SHA-256("")``. A tree of ``n`` leaves splits at the largest power of two
smaller than ``n``.

Storage model: a tree is read through :class:`SubtreeSource`, which answers the hashes of *complete*
subtrees. Node ``(level, index)`` covers the ``2**level`` leaves starting at ``index << level``; only
complete subtrees ever exist, so a node, once written, never changes. Every proof element and every
root is the right-to-left fold of at most ``log2(n)`` such nodes, so producing a proof reads
``O(log n)`` stored hashes in one batch and never touches the leaves. :class:`MemoryTree` keeps all
nodes in memory (tests, benchmarks, the verifier); the audit log's database table keeps the same
nodes (:mod:`medcollab.audit.services`). :class:`CompactRange` keeps only the ``O(log n)`` nodes on
the right edge, which is all that appending and computing the current root need.

The verifiers implement the algorithms of RFC 9162 sections 2.1.3.2 and 2.1.4.2 and raise
:class:`ProofInvalid` on any failure; they never return a boolean. Unlike RFC 9162, a consistency
proof *from* the empty tree is refused: it proves nothing, and accepting it would let a caller skip a
check by passing size 0.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from hashlib import sha256
from typing import Final, Protocol

from medcollab.errors import InvalidInput, MedcollabError

HASH_SIZE: Final = 32
EMPTY_ROOT: Final = sha256(b"").digest()
_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"

#: A complete subtree: ``(level, index)`` covers leaves ``[index << level, (index + 1) << level)``.
NodeKey = tuple[int, int]


class ProofOutOfRange(InvalidInput):
    """A proof or root was requested for a leaf index or tree size the tree does not have."""

    code = "proof_out_of_range"


class ProofInvalid(MedcollabError):
    """A Merkle proof did not verify against the given hashes and sizes."""

    code = "proof_invalid"


# Hashing ------------------------------------------------------------------------------------------


def leaf_hash(data: bytes) -> bytes:
    """RFC 6962 leaf hash: ``SHA-256(0x00 || data)``."""
    return sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: ``SHA-256(0x01 || left || right)``."""
    return sha256(_NODE_PREFIX + left + right).digest()


def root(leaves: Sequence[bytes]) -> bytes:
    """The Merkle tree hash ``MTH(D[n])`` of the entries ``leaves`` (raw data, not leaf hashes)."""
    return root_from_leaf_hashes([leaf_hash(entry) for entry in leaves])


def root_from_leaf_hashes(hashes: Iterable[bytes]) -> bytes:
    """The root of the tree whose leaf hashes are ``hashes``, in order."""
    compact = CompactRange()
    for h in hashes:
        compact.append(h)
    return compact.root()


def _fold(hashes: Sequence[bytes]) -> bytes:
    # The root of consecutive complete subtrees of decreasing size is their right-to-left fold,
    # because RFC 6962 always splits off the largest complete subtree on the left first.
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


# Decomposition into complete subtrees -------------------------------------------------------------


def _largest_power_of_two_below(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (for ``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def subtree_cover(start: int, end: int) -> list[NodeKey]:
    """The complete subtrees whose concatenation is the leaf range ``[start, end)``, left to right.

    For the ranges RFC 6962's recursion produces (``start`` is a multiple of a power of two at least
    as large as the range), the subtrees shrink from left to right, and the range's Merkle tree hash
    is their right-to-left fold.
    """
    keys: list[NodeKey] = []
    while start < end:
        span = end - start
        # The largest aligned block starting at ``start`` that still fits in the range.
        level = span.bit_length() - 1
        if start:
            level = min(level, (start & -start).bit_length() - 1)
        keys.append((level, start >> level))
        start += 1 << level
    return keys


def frontier_keys(size: int) -> list[NodeKey]:
    """The complete subtrees that make up a tree of ``size`` leaves (one per set bit of ``size``)."""
    return subtree_cover(0, size)


def _inclusion_plan(index: int, size: int) -> list[list[NodeKey]]:
    # RFC 6962 section 2.1.1: PATH(m, D[n]) descends from the root towards leaf m; at each split the
    # sibling range is one proof element. The path lists elements leaf-first, so it is reversed.
    plan: list[list[NodeKey]] = []
    start, end = 0, size
    while end - start > 1:
        k = _largest_power_of_two_below(end - start)
        if index < start + k:
            plan.append(subtree_cover(start + k, end))
            end = start + k
        else:
            plan.append(subtree_cover(start, start + k))
            start += k
    plan.reverse()
    return plan


def _consistency_plan(size1: int, size2: int) -> list[list[NodeKey]]:
    # RFC 6962 section 2.1.2: SUBPROOF(m, D[n], b). ``whole`` is b: true while the old tree is the
    # left part of the range being examined, in which case its root is known to the verifier.
    plan: list[list[NodeKey]] = []
    start, end, m, whole = 0, size2, size1, True
    while True:
        if m == end - start:
            if not whole:
                plan.append(subtree_cover(start, end))
            break
        k = _largest_power_of_two_below(end - start)
        if m <= k:
            plan.append(subtree_cover(start + k, end))
            end = start + k
        else:
            plan.append(subtree_cover(start, start + k))
            start += k
            m -= k
            whole = False
    plan.reverse()
    return plan


# Reading trees ------------------------------------------------------------------------------------


class SubtreeSource(Protocol):
    """Anything that can answer the hashes of complete subtrees of one append-only tree."""

    def tree_size(self) -> int:
        """The number of leaves in the tree."""
        ...

    def get_nodes(self, keys: Sequence[NodeKey]) -> list[bytes]:
        """The hashes of the complete subtrees ``keys``, in the same order, in one round trip."""
        ...


def _check_size(size: int, tree_size: int) -> None:
    if size < 0 or size > tree_size:
        raise ProofOutOfRange(f"tree size {size} is out of range: the tree has {tree_size} leaves")


def _resolve(plan: list[list[NodeKey]], source: SubtreeSource) -> list[bytes]:
    keys = [key for element in plan for key in element]
    hashes = iter(source.get_nodes(keys)) if keys else iter(())
    return [_fold([next(hashes) for _ in element]) for element in plan]


def root_at(size: int, source: SubtreeSource) -> bytes:
    """The root hash of the first ``size`` leaves of ``source``."""
    _check_size(size, source.tree_size())
    if size == 0:
        return EMPTY_ROOT
    return _fold(source.get_nodes(frontier_keys(size)))


def inclusion_proof(index: int, size: int, source: SubtreeSource) -> list[bytes]:
    """The RFC 6962 audit path of leaf ``index`` in the tree of the first ``size`` leaves."""
    _check_size(size, source.tree_size())
    if not 0 <= index < size:
        raise ProofOutOfRange(
            f"leaf index {index} is out of range for a tree of size {size} "
            f"(valid indexes are 0 to {size - 1})"
            if size
            else f"leaf index {index} is out of range: a tree of size 0 has no leaves"
        )
    return _resolve(_inclusion_plan(index, size), source)


def consistency_proof(size1: int, size2: int, source: SubtreeSource) -> list[bytes]:
    """The RFC 6962 proof that the tree of ``size1`` leaves is a prefix of the one of ``size2``."""
    _check_size(size2, source.tree_size())
    if size1 <= 0:
        raise ProofOutOfRange("a consistency proof from the empty tree proves nothing; size1 >= 1")
    if size1 > size2:
        raise ProofOutOfRange(f"size1 ({size1}) is larger than size2 ({size2})")
    return _resolve(_consistency_plan(size1, size2), source)


# Verification (RFC 9162 sections 2.1.3.2 and 2.1.4.2) ---------------------------------------------


def _check_hashes(*hashes: bytes) -> None:
    if any(len(h) != HASH_SIZE for h in hashes):
        raise ProofInvalid(f"a hash in the proof or its inputs is not {HASH_SIZE} bytes")


def _equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _skip_right_edge(fn: int, sn: int) -> tuple[int, int]:
    # On the right edge of a tree that is not complete, a node has no right sibling: climb until
    # the node is a right child (or the root), without consuming proof elements.
    if fn & 1:
        return fn, sn
    while fn and not fn & 1:
        fn >>= 1
        sn >>= 1
    return fn, sn


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise :class:`ProofInvalid` unless ``proof`` shows ``leaf_hash`` at ``index`` under ``root``."""
    _check_hashes(leaf_hash, root, *proof)
    if not 0 <= index < size:
        raise ProofInvalid(f"leaf index {index} is not inside a tree of size {size}")
    fn, sn, r = index, size - 1, leaf_hash
    for p in proof:
        if sn == 0:
            raise ProofInvalid("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            fn, sn = _skip_right_edge(fn, sn)
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofInvalid("inclusion proof is shorter than the tree is deep")
    if not _equal(r, root):
        raise ProofInvalid("inclusion proof does not lead to the root hash")


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> None:
    """Raise :class:`ProofInvalid` unless ``proof`` shows tree ``size1`` is a prefix of ``size2``."""
    _check_hashes(root1, root2, *proof)
    if size1 <= 0:
        raise ProofInvalid("a consistency proof from the empty tree is refused")
    if size1 > size2:
        raise ProofInvalid(f"size1 ({size1}) is larger than size2 ({size2})")
    if size1 == size2:
        if proof:
            raise ProofInvalid("a consistency proof between equal sizes must be empty")
        if not _equal(root1, root2):
            raise ProofInvalid("trees of equal size have different root hashes")
        return
    if not proof:
        raise ProofInvalid("consistency proof is empty")
    path = list(proof)
    if size1 & (size1 - 1) == 0:
        # The old tree is a complete subtree, so its root is the proof's implicit first element.
        path.insert(0, root1)
    fr, sr = _consistency_roots(size1, size2, path)
    if not _equal(fr, root1):
        raise ProofInvalid("consistency proof does not lead to the old root hash")
    if not _equal(sr, root2):
        raise ProofInvalid("consistency proof does not lead to the new root hash")


def _consistency_roots(size1: int, size2: int, path: Sequence[bytes]) -> tuple[bytes, bytes]:
    # RFC 9162 section 2.1.4.2, steps 3 to 7: rebuild both roots from the one path.
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofInvalid("consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            fn, sn = _skip_right_edge(fn, sn)
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofInvalid("consistency proof is shorter than the tree is deep")
    return fr, sr


# Trees --------------------------------------------------------------------------------------------


class CompactRange:
    """The right edge of an append-only tree: one complete subtree per set bit of the size.

    Appending a leaf is ``O(log n)`` (amortised ``O(1)``) and returns the complete subtrees it
    finished, which is exactly what a store of nodes must add.
    """

    __slots__ = ("_nodes", "_size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        keys = frontier_keys(size)
        if len(keys) != len(hashes):
            raise ValueError(f"a tree of size {size} has {len(keys)} frontier nodes")
        self._size = size
        self._nodes: list[tuple[NodeKey, bytes]] = list(zip(keys, hashes, strict=True))

    @property
    def size(self) -> int:
        return self._size

    def append(self, leaf: bytes) -> list[tuple[NodeKey, bytes]]:
        """Add one leaf hash; returns the newly completed nodes, the leaf itself first."""
        key: NodeKey = (0, self._size)
        created = [(key, leaf)]
        node = leaf
        while self._nodes and self._nodes[-1][0][0] == key[0]:
            (level, index), left = self._nodes.pop()
            node = node_hash(left, node)
            key = (level + 1, index >> 1)
            created.append((key, node))
        self._nodes.append((key, node))
        self._size += 1
        return created

    def root(self) -> bytes:
        if not self._nodes:
            return EMPTY_ROOT
        return _fold([h for _, h in self._nodes])


class MemoryTree:
    """A whole tree in memory: every complete subtree, 32 bytes each, in one bytearray per level.

    Appending is ``O(log n)``; roots and proofs at any size are ``O(log n)`` lookups.
    """

    __slots__ = ("_levels",)

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[bytearray] = [bytearray()]
        for h in leaf_hashes:
            self.append(h)

    @classmethod
    def from_entries(cls, entries: Iterable[bytes]) -> MemoryTree:
        return cls(leaf_hash(entry) for entry in entries)

    def tree_size(self) -> int:
        return len(self._levels[0]) // HASH_SIZE

    def append(self, leaf: bytes) -> int:
        """Add one leaf hash; returns its index."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"a leaf hash is {HASH_SIZE} bytes")
        index = self.tree_size()
        self._levels[0] += leaf
        level, i, node = 0, index, leaf
        while i & 1:
            row = self._levels[level]
            left = bytes(row[(i - 1) * HASH_SIZE : i * HASH_SIZE])
            node = node_hash(left, node)
            level, i = level + 1, i >> 1
            if len(self._levels) == level:
                self._levels.append(bytearray())
            self._levels[level] += node
        return index

    def node(self, level: int, index: int) -> bytes:
        row = self._levels[level] if level < len(self._levels) else b""
        start = index * HASH_SIZE
        if index < 0 or start + HASH_SIZE > len(row):
            raise KeyError((level, index))
        return bytes(row[start : start + HASH_SIZE])

    def get_nodes(self, keys: Sequence[NodeKey]) -> list[bytes]:
        return [self.node(level, index) for level, index in keys]

    def leaf(self, index: int) -> bytes:
        return self.node(0, index)

    def root(self, size: int | None = None) -> bytes:
        return root_at(self.tree_size() if size is None else size, self)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        return inclusion_proof(index, self.tree_size() if size is None else size, self)

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        return consistency_proof(size1, self.tree_size() if size2 is None else size2, self)

    def compact_range(self, size: int | None = None) -> CompactRange:
        size = self.tree_size() if size is None else size
        return CompactRange(size, self.get_nodes(frontier_keys(size)))
