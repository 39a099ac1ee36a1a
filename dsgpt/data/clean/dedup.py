"""Exact and near-duplicate removal across the whole input; the first occurrence is kept.

Both keep a fixed-size signature per kept document, never the document itself:

- ExactDedup: the 16-byte BLAKE2b digest of the normalised text (`normalize`: Unicode NFKC, then
  case folding, then every run of whitespace as one space, ends stripped).
- NearDedup: a MinHash signature (datasketch) of the set of word shingles (`shingle_words`
  consecutive words of the normalised text), indexed by LSH banding. A document is a near
  duplicate when some earlier kept document that shares a band has an estimated Jaccard
  similarity (the fraction of equal signature values) of at least `threshold`.

Why the band index is written here rather than datasketch's MinHashLSH: its in-memory storage keeps
a set per bucket and a list of band keys per document, about 7.8 KB per document at 25 bands
(measured with tracemalloc), while removal in stream order needs only "which kept documents
fell in this bucket": one dict per band of int -> document number, about a third of that. MinHash
itself (permutations, hashing) is datasketch's.
"""

from __future__ import annotations

import hashlib
import sys
import unicodedata
import zlib

import numpy as np

_SIG_CHUNK = 16384  # signatures are stored in blocks of this many rows
RECALL_AT_THRESHOLD = 0.85  # LSH bands are chosen so that a pair exactly at the threshold is found this often


def normalize(text: str) -> str:
    """The text that exact dedup hashes: NFKC, case-folded, whitespace runs collapsed to one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


class ExactDedup:
    def __init__(self):
        self._seen: set[bytes] = set()
        self.removed = 0

    def is_duplicate(self, normalized: str) -> bool:
        digest = hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()
        if digest in self._seen:
            self.removed += 1
            return True
        self._seen.add(digest)
        return False

    def state_bytes(self) -> int:
        """Memory held: the set and its digest objects."""
        return sys.getsizeof(self._seen) + len(self._seen) * sys.getsizeof(b"\0" * 16)

    @property
    def n_kept(self) -> int:
        return len(self._seen)


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64's constants
_STEP = np.uint64(0x9E3779B97F4A7C15)


def _as_is(value):
    return value


def shingle_hashes(words: list[str], n: int) -> np.ndarray:
    """The distinct 32-bit hashes of the document's shingles (runs of n words; the whole document
    when it is shorter). Each word is hashed once (CRC-32 of its UTF-8 bytes), the shingle
    combines its words' hashes and goes through splitmix64's finaliser, keeping the top 32 bits:
    vectorised, deterministic across processes, and ~10x faster than a SHA-1 per shingle."""
    wh = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))
    span = min(n, len(words))
    h = wh[: len(wh) - span + 1].copy()
    for j in range(1, span):
        h = h * _STEP + wh[j : len(wh) - span + 1 + j]  # uint64 arithmetic wraps mod 2**64
    h ^= h >> np.uint64(30)
    h *= _M1
    h ^= h >> np.uint64(27)
    h *= _M2
    h ^= h >> np.uint64(31)
    return np.unique(h >> np.uint64(32))


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band): the most rows per band (fewest bands: least memory) such that two
    documents whose Jaccard similarity equals the threshold share a band with probability >=
    RECALL_AT_THRESHOLD, i.e. 1 - (1 - t**rows)**bands."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= RECALL_AT_THRESHOLD:
            best = (bands, rows)
    return best


class NearDedup:
    def __init__(self, threshold: float = 0.6, num_perm: int = 128, shingle_words: int = 3, seed: int = 1):
        from datasketch import MinHash

        self.threshold, self.num_perm, self.shingle_words = threshold, num_perm, shingle_words
        # The shingles arrive hashed (shingle_hashes): datasketch applies its permutations to them.
        self._template = MinHash(num_perm=num_perm, seed=seed, hashfunc=_as_is)
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        rng = np.random.default_rng(seed)
        # Random odd multipliers: a band's key is sum(value * multiplier) mod 2**64.
        self._mult = rng.integers(0, 2**63, size=self.rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._tables: list[dict] = [{} for _ in range(self.bands)]
        self._blocks: list[np.ndarray] = []
        self.n_kept = 0
        self.removed = 0
        self._lists = 0
        self._itemsize = self._template.hashvalues.dtype.itemsize

    def signature(self, normalized: str) -> np.ndarray | None:
        """The MinHash of the document's word shingles (uint32[num_perm]); None without words."""
        words = normalized.split(" ") if normalized else []
        if not words:
            return None
        m = self._template.copy()
        m.update_batch(shingle_hashes(words, self.shingle_words).tolist())
        return m.hashvalues

    def is_duplicate(self, normalized: str) -> bool:
        """True (and counted) when an earlier kept document is a near duplicate; otherwise the
        document's signature is kept for the ones after it."""
        sig = self.signature(normalized)
        if sig is None:
            return False
        keys = self._band_keys(sig)
        checked = set()
        for table, key in zip(self._tables, keys):
            hit = table.get(key)
            if hit is None:
                continue
            for doc in (hit,) if isinstance(hit, int) else hit:
                if doc in checked:
                    continue
                checked.add(doc)
                if self.similarity(sig, self._signature_of(doc)) >= self.threshold:
                    self.removed += 1
                    return True
        self._keep(sig, keys)
        return False

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(np.count_nonzero(a == b)) / self.num_perm

    def _band_keys(self, sig: np.ndarray) -> list[int]:
        bands = sig[: self.bands * self.rows].reshape(self.bands, self.rows).astype(np.uint64)
        return (bands * self._mult).sum(axis=1, dtype=np.uint64).tolist()  # wraps mod 2**64

    def _keep(self, sig: np.ndarray, keys: list[int]) -> None:
        doc = self.n_kept
        block, row = divmod(doc, _SIG_CHUNK)
        if block == len(self._blocks):
            self._blocks.append(np.empty((_SIG_CHUNK, self.num_perm), dtype=sig.dtype))
        self._blocks[block][row] = sig
        for table, key in zip(self._tables, keys):
            hit = table.get(key)
            if hit is None:
                table[key] = doc
            elif isinstance(hit, int):
                table[key] = [hit, doc]
                self._lists += 1
            else:
                hit.append(doc)
        self.n_kept += 1

    def _signature_of(self, doc: int) -> np.ndarray:
        block, row = divmod(doc, _SIG_CHUNK)
        return self._blocks[block][row]

    def state_bytes(self) -> int:
        """Memory held: the signatures (the rows in use), the band tables and their int keys, the
        lists of buckets that hold several documents, and one int per kept document (shared by
        its bands)."""
        sig = self.n_kept * self.num_perm * self._itemsize
        entries = sum(len(t) for t in self._tables)
        tables = sum(sys.getsizeof(t) for t in self._tables) + entries * sys.getsizeof(2**63)
        return sig + tables + self._lists * sys.getsizeof([0, 0]) + self.n_kept * sys.getsizeof(2**20)
