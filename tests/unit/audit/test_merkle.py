"""RFC 6962 / RFC 9162 Merkle hashing, proofs and verification, against published vectors.

The vectors are those of the RFC 6962 reference implementations (certificate-transparency and
transparency-dev/merkle): eight leaves of increasing length, the root of every prefix, and known
inclusion and consistency proofs. The corrupted-proof probes are the ones those implementations run:
every proof a verifier accepts must stop verifying when any one input is wrong.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable, Sequence

import pytest

from medcollab.audit import merkle
from medcollab.audit.merkle import (
    EMPTY_ROOT,
    CompactRange,
    MemoryTree,
    ProofInvalid,
    ProofOutOfRange,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    verify_consistency,
    verify_inclusion,
)
from medcollab.errors import InvalidInput


def h(hex_text: str) -> bytes:
    return bytes.fromhex(hex_text)


LEAVES: tuple[bytes, ...] = (
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
)

#: The root of the first n leaves, for n = 1..8.
ROOTS: tuple[bytes, ...] = tuple(
    h(x)
    for x in (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    )
)

#: (leaf index, tree size, proof), leaf indexes 0-based.
INCLUSION_VECTORS: tuple[tuple[int, int, tuple[bytes, ...]], ...] = (
    (
        0,
        8,
        (
            h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ),
    ),
    (
        5,
        8,
        (
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ),
    ),
    (2, 3, (h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),)),
    (
        1,
        5,
        (
            h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ),
    ),
    (0, 1, ()),
)

#: (size1, size2, proof).
CONSISTENCY_VECTORS: tuple[tuple[int, int, tuple[bytes, ...]], ...] = (
    (1, 1, ()),
    (
        1,
        8,
        (
            h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ),
    ),
    (
        6,
        8,
        (
            h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ),
    ),
    (
        2,
        5,
        (
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ),
    ),
    (
        6,
        7,
        (
            h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ),
    ),
)

SOME_HASH = h("abacaba000000000000000000000000000000000000000000060061e00123456")


@pytest.fixture(scope="module")
def tree() -> MemoryTree:
    return MemoryTree.from_entries(LEAVES)


# Hashes -------------------------------------------------------------------------------------------


def test_hash_known_answers() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert root([]) == EMPTY_ROOT
    # The empty leaf is not the empty tree: the 0x00 prefix separates them.
    assert leaf_hash(b"").hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )
    assert leaf_hash(b"L123456").hex() == (
        "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
    )
    assert node_hash(b"N123", b"N456").hex() == (
        "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"
    )


def test_leaf_and_node_hashes_are_domain_separated() -> None:
    a, b = leaf_hash(b"Hello"), leaf_hash(b"World")
    assert node_hash(a, b) != leaf_hash(a + b)
    assert node_hash(a, b) != node_hash(b, a)


@pytest.mark.parametrize("size", range(1, 9))
def test_roots_of_every_prefix(size: int, tree: MemoryTree) -> None:
    assert root(LEAVES[:size]) == ROOTS[size - 1]
    assert tree.root(size) == ROOTS[size - 1]
    assert merkle.root_from_leaf_hashes(leaf_hash(x) for x in LEAVES[:size]) == ROOTS[size - 1]


def test_memory_tree_root_of_empty_prefix(tree: MemoryTree) -> None:
    assert tree.root(0) == EMPTY_ROOT
    assert MemoryTree().root() == EMPTY_ROOT


# Known proofs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("index", "size", "proof"), INCLUSION_VECTORS)
def test_inclusion_vectors(
    index: int, size: int, proof: tuple[bytes, ...], tree: MemoryTree
) -> None:
    assert tuple(tree.inclusion_proof(index, size)) == proof
    verify_inclusion(leaf_hash(LEAVES[index]), index, size, proof, ROOTS[size - 1])


@pytest.mark.parametrize(("size1", "size2", "proof"), CONSISTENCY_VECTORS)
def test_consistency_vectors(
    size1: int, size2: int, proof: tuple[bytes, ...], tree: MemoryTree
) -> None:
    assert tuple(tree.consistency_proof(size1, size2)) == proof
    verify_consistency(size1, size2, proof, ROOTS[size1 - 1], ROOTS[size2 - 1])


# Generation against the RFC's recursive definitions ----------------------------------------------


def _mth(hashes: Sequence[bytes]) -> bytes:
    if len(hashes) == 1:
        return hashes[0]
    k = 1 << ((len(hashes) - 1).bit_length() - 1)
    return node_hash(_mth(hashes[:k]), _mth(hashes[k:]))


def _path(m: int, hashes: Sequence[bytes]) -> list[bytes]:
    # RFC 6962 section 2.1.1, literally.
    n = len(hashes)
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return [*_path(m, hashes[:k]), _mth(hashes[k:])]
    return [*_path(m - k, hashes[k:]), _mth(hashes[:k])]


def _subproof(m: int, hashes: Sequence[bytes], whole: bool) -> list[bytes]:
    # RFC 6962 section 2.1.2, literally.
    n = len(hashes)
    if m == n:
        return [] if whole else [_mth(hashes)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*_subproof(m, hashes[:k], whole), _mth(hashes[k:])]
    return [*_subproof(m - k, hashes[k:], False), _mth(hashes[:k])]


@pytest.fixture(scope="module")
def big_tree() -> tuple[MemoryTree, list[bytes]]:
    hashes = [leaf_hash(i.to_bytes(2, "big")) for i in range(40)]
    return MemoryTree(hashes), hashes


def test_generated_proofs_match_the_rfc_definitions(
    big_tree: tuple[MemoryTree, list[bytes]],
) -> None:
    tree, hashes = big_tree
    for size in range(1, 41):
        assert tree.root(size) == _mth(hashes[:size])
        for index in range(size):
            proof = tree.inclusion_proof(index, size)
            assert proof == _path(index, hashes[:size])
            verify_inclusion(hashes[index], index, size, proof, tree.root(size))
        for size1 in range(1, size + 1):
            proof = tree.consistency_proof(size1, size)
            assert proof == _subproof(size1, hashes[:size], True)
            verify_consistency(size1, size, proof, tree.root(size1), tree.root(size))


def test_compact_range_agrees_with_the_whole_tree(
    big_tree: tuple[MemoryTree, list[bytes]],
) -> None:
    tree, hashes = big_tree
    compact = CompactRange()
    for i, leaf in enumerate(hashes):
        created = compact.append(leaf)
        assert created[0] == ((0, i), leaf)
        for (level, index), node in created:
            assert tree.node(level, index) == node
        assert compact.root() == tree.root(i + 1)
    resumed = tree.compact_range(23)
    assert resumed.size == 23
    for leaf in hashes[23:]:
        resumed.append(leaf)
    assert resumed.root() == tree.root()


def test_compact_range_needs_exactly_its_frontier() -> None:
    with pytest.raises(ValueError, match="frontier"):
        CompactRange(5, [SOME_HASH])
    assert merkle.frontier_keys(5) == [(2, 0), (0, 4)]
    assert merkle.frontier_keys(0) == []


def test_memory_tree_rejects_bad_input(tree: MemoryTree) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        MemoryTree().append(b"short")
    with pytest.raises(KeyError):
        tree.node(0, 8)
    with pytest.raises(KeyError):
        tree.node(9, 0)


# Out of range: a clear 4xx-class error, never an IndexError --------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t: t.inclusion_proof(8, 8), "leaf index 8 is out of range for a tree of size 8"),
        (lambda t: t.inclusion_proof(-1, 8), "leaf index -1 is out of range"),
        (lambda t: t.inclusion_proof(0, 0), "a tree of size 0 has no leaves"),
        (lambda t: t.inclusion_proof(0, 9), "tree size 9 is out of range: the tree has 8 leaves"),
        (lambda t: t.consistency_proof(0, 8), "from the empty tree proves nothing"),
        (lambda t: t.consistency_proof(5, 4), "size1 (5) is larger than size2 (4)"),
        (lambda t: t.consistency_proof(1, 9), "tree size 9 is out of range"),
        (lambda t: t.root(9), "tree size 9 is out of range"),
        (lambda t: t.root(-1), "tree size -1 is out of range"),
    ],
)
def test_out_of_range_requests_are_refused_clearly(
    call: Callable[[MemoryTree], object], message: str, tree: MemoryTree
) -> None:
    with pytest.raises(ProofOutOfRange, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(tree)
    assert issubclass(ProofOutOfRange, InvalidInput)  # Mapped to 400 by the API.


def test_module_functions_take_any_subtree_source(tree: MemoryTree) -> None:
    assert inclusion_proof(5, 8, tree) == tree.inclusion_proof(5, 8)
    assert consistency_proof(6, 8, tree) == tree.consistency_proof(6, 8)


# Corrupted proofs must be rejected --------------------------------------------------------------


def _flip(data: bytes, bit: int) -> bytes:
    return bytes([data[0] ^ (1 << bit), *data[1:]])


def _inclusion_probes(
    index: int, size: int, proof: list[bytes], root_hash: bytes, leaf: bytes
) -> list[tuple[str, int, int, list[bytes], bytes, bytes]]:
    probes = [
        ("index - 1", index - 1, size, proof, root_hash, leaf),
        ("index + 1", index + 1, size, proof, root_hash, leaf),
        ("index ^ 2", index ^ 2, size, proof, root_hash, leaf),
        ("size * 2", index, size * 2, proof, root_hash, leaf),
        ("size / 2", index, size // 2, proof, root_hash, leaf),
        ("wrong leaf", index, size, proof, root_hash, leaf_hash(b"WrongLeaf")),
        ("empty root", index, size, proof, EMPTY_ROOT, leaf),
        ("random root", index, size, proof, SOME_HASH, leaf),
        ("short root", index, size, proof, root_hash[:31], leaf),
        ("trailing empty", index, size, [*proof, b""], root_hash, leaf),
        ("trailing root", index, size, [*proof, root_hash], root_hash, leaf),
        ("preceding empty", index, size, [b"", *proof], root_hash, leaf),
        ("preceding root", index, size, [root_hash, *proof], root_hash, leaf),
    ]
    for i in range(len(proof)):
        flipped = [*proof]
        flipped[i] = _flip(flipped[i], 3)
        probes.append((f"proof[{i}] bit 3 flipped", index, size, flipped, root_hash, leaf))
    if proof:
        probes.append(("last element removed", index, size, proof[:-1], root_hash, leaf))
    if len(proof) > 1:
        probes.append(
            ("element inserted", index, size, [proof[0], SOME_HASH, *proof[1:]], root_hash, leaf)
        )
    return probes


def _consistency_probes(
    size1: int, size2: int, proof: list[bytes], root1: bytes, root2: bytes
) -> list[tuple[str, int, int, list[bytes], bytes, bytes]]:
    probes = [
        ("size1 - 1", size1 - 1, size2, proof, root1, root2),
        ("size1 + 1", size1 + 1, size2, proof, root1, root2),
        ("size1 ^ 2", size1 ^ 2, size2, proof, root1, root2),
        ("size2 * 2", size1, size2 * 2, proof, root1, root2),
        ("size2 / 2", size1, size2 // 2, proof, root1, root2),
        ("wrong root1", size1, size2, proof, SOME_HASH, root2),
        ("wrong root2", size1, size2, proof, root1, SOME_HASH),
        ("swapped roots", size1, size2, proof, root2, root1),
        ("empty proof", size1, size2, [], root1, root2),
        ("trailing empty", size1, size2, [*proof, b""], root1, root2),
        ("trailing root1", size1, size2, [*proof, root1], root1, root2),
        ("trailing root2", size1, size2, [*proof, root2], root1, root2),
        ("preceding empty", size1, size2, [b"", *proof], root1, root2),
        ("preceding root1", size1, size2, [root1, *proof], root1, root2),
        ("preceding root2", size1, size2, [root2, *proof], root1, root2),
        ("preceding proof[0]", size1, size2, [proof[0], *proof], root1, root2),
        ("truncated", size1, size2, proof[:-1], root1, root2),
    ]
    for i in range(len(proof)):
        flipped = [*proof]
        flipped[i] = _flip(flipped[i], 4)
        probes.append((f"proof[{i}] bit 4 flipped", size1, size2, flipped, root1, root2))
    return probes


@pytest.mark.parametrize(("index", "size", "proof"), INCLUSION_VECTORS)
def test_corrupted_inclusion_proofs_are_rejected(
    index: int, size: int, proof: tuple[bytes, ...]
) -> None:
    leaf = leaf_hash(LEAVES[index])
    accepted = []
    for desc, i, n, p, r, lf in _inclusion_probes(index, size, list(proof), ROOTS[size - 1], leaf):
        try:
            verify_inclusion(lf, i, n, p, r)
        except ProofInvalid:
            continue
        accepted.append(desc)
    assert accepted == []


@pytest.mark.parametrize(("size1", "size2", "proof"), CONSISTENCY_VECTORS[1:])
def test_corrupted_consistency_proofs_are_rejected(
    size1: int, size2: int, proof: tuple[bytes, ...]
) -> None:
    accepted = []
    for desc, s1, s2, p, r1, r2 in _consistency_probes(
        size1, size2, list(proof), ROOTS[size1 - 1], ROOTS[size2 - 1]
    ):
        try:
            verify_consistency(s1, s2, p, r1, r2)
        except ProofInvalid:
            continue
        accepted.append(desc)
    assert accepted == []


def test_single_leaf_inclusion() -> None:
    leaf = leaf_hash(b"data")
    verify_inclusion(leaf, 0, 1, [], leaf)  # The root of a one-leaf tree is the leaf.
    for bad_leaf, bad_root in ((leaf, b""), (b"", leaf), (b"", b"")):
        with pytest.raises(ProofInvalid):
            verify_inclusion(bad_leaf, 0, 1, [], bad_root)
    for index, size in ((0, 0), (1, 0), (2, 1), (1, 1)):
        with pytest.raises(ProofInvalid):
            verify_inclusion(leaf, index, size, [], leaf)


def test_consistency_edge_cases() -> None:
    a, b = ROOTS[0], ROOTS[1]
    verify_consistency(1, 1, [], a, a)  # Equal sizes: an empty proof and equal roots.
    cases = [
        (0, 0, [], a, a, "from the empty tree is refused"),
        (0, 1, [], a, b, "from the empty tree is refused"),
        (1, 1, [], a, b, "different root hashes"),
        (1, 1, [a], a, a, "equal sizes must be empty"),
        (2, 1, [], b, a, "larger than size2"),
        (1, 2, [], a, b, "is empty"),
    ]
    for size1, size2, proof, root1, root2, message in cases:
        with pytest.raises(ProofInvalid, match=message):
            verify_consistency(size1, size2, proof, root1, root2)


# Performance: proofs over a million leaves -------------------------------------------------------


@pytest.mark.slow
def test_proofs_over_a_million_leaves_take_under_5_ms() -> None:
    tree = MemoryTree(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(1_000_000))
    size = tree.tree_size()
    inclusion: list[float] = []
    consistency: list[float] = []
    for i in range(200):
        index = (i * 4_999) % size
        started = time.perf_counter()
        proof = tree.inclusion_proof(index, size)
        inclusion.append(time.perf_counter() - started)
        started = time.perf_counter()
        cons = tree.consistency_proof(index + 1, size)
        consistency.append(time.perf_counter() - started)
        if i % 50 == 0:
            verify_inclusion(tree.leaf(index), index, size, proof, tree.root())
            verify_consistency(index + 1, size, cons, tree.root(index + 1), tree.root())
    # The 95th percentile, so one scheduler hiccup on a shared test machine does not decide it.
    assert statistics.quantiles(inclusion, n=20)[-1] < 0.005
    assert statistics.quantiles(consistency, n=20)[-1] < 0.005
