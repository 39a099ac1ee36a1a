"""Quality filters: the Gopher rules (Rae et al. 2021, appendix A.1.1 and table A1) and a script check.

Each rule measures one thing about a document and keeps it or drops it; settings.FILTERS lists them
with their parameters and default thresholds. Definitions (the README repeats them for users):

- words: the document split on whitespace; a word's length is counted after stripping the
  punctuation around it (words that are only punctuation then have no length and are left out of
  the mean word length).
- lines: the non-blank lines, stripped of surrounding whitespace; paragraphs: text between blank lines.
- word_count: min <= number of words <= max.
- mean_word_length: min <= mean word length <= max.
- symbol_ratio: '#' characters per word <= max, and ellipses ('...' or '…') per word <= max.
- alphabetic_words: fraction of words with at least one alphabetic character >= min.
- stop_words: at least `min` distinct stop words among the words (case-folded, punctuation stripped).
- bullet_lines: fraction of lines starting with a bullet (BULLETS) <= max.
- ellipsis_lines: fraction of lines ending with '...' or '…' <= max.
- script: of all letters (Unicode category L), the fraction in the named script(s) >= min; a
  document without letters fails.
- duplicate_lines / duplicate_paragraphs: the lines (paragraphs) equal to an earlier one, as a
  fraction of all lines <= max_fraction, and their characters as a fraction of all lines'
  characters <= max_char_fraction.
- top_ngrams: for each n, the characters (word lengths, without spaces) of the commonest word
  n-gram times its count, over all words' characters <= the limit; n-grams seen once count 0.
- duplicate_ngrams: for each n, the characters of the words covered by any n-gram that occurs
  more than once (every occurrence, each word counted once), over all words' characters <= the limit.
"""

from __future__ import annotations

from collections import Counter
from functools import cached_property, lru_cache

import numpy as np

from dsgpt.data.clean.settings import FILTERS

ELLIPSES = ("...", "…")
BULLETS = ("•", "‣", "⁃", "◦", "●", "○", "▪", "▫", "■", "□", "-", "*", "–", "—", "·")
# Stripped from the ends of words before their length is counted (ASCII and common Unicode marks).
PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~«»‘’‚‛“”„‟‹›¡¿…–—·•"
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier for rolling n-gram hashes


class Doc:
    """One document's measurements, each computed once and only when a rule asks for it."""

    def __init__(self, text: str):
        self.text = text

    @cached_property
    def words(self) -> list[str]:
        return self.text.split()

    @cached_property
    def bare_words(self) -> list[str]:
        return [w.strip(PUNCTUATION) for w in self.words]

    @cached_property
    def lines(self) -> list[str]:
        return [line.strip() for line in self.text.splitlines() if line.strip()]

    @cached_property
    def paragraphs(self) -> list[str]:
        paras, current = [], []
        for line in self.text.splitlines():
            if line.strip():
                current.append(line.strip())
            elif current:
                paras.append("\n".join(current))
                current = []
        if current:
            paras.append("\n".join(current))
        return paras

    @cached_property
    def word_ids(self) -> np.ndarray:
        """Each word as a small integer (equal words, equal ids), 1-based."""
        index: dict[str, int] = {}
        ids = [index.setdefault(w, len(index) + 1) for w in self.words]
        return np.asarray(ids, dtype=np.uint64)

    @cached_property
    def char_prefix(self) -> np.ndarray:
        """Cumulative word lengths: the characters of words [i, j) are prefix[j] - prefix[i]."""
        lengths = np.fromiter(map(len, self.words), dtype=np.int64, count=len(self.words))
        return np.concatenate(([0], np.cumsum(lengths)))

    def ngram_counts(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(occurrences of the n-gram starting at each position, chars of that n-gram) for word n-grams."""
        cache = self.__dict__.setdefault("_ngrams", {})
        if n not in cache:
            ids = self.word_ids
            if len(ids) < n:
                cache[n] = (np.zeros(0, np.int64), np.zeros(0, np.int64))
            else:
                k, hashes = cache.get("_hash", (1, ids))
                if k > n:  # a shorter n after a longer one: start again from single words
                    k, hashes = 1, ids
                while k < n:  # extend (k)-gram hashes to (k+1)-grams; uint64 arithmetic wraps
                    hashes = hashes[:-1] * _MIX + ids[k:]
                    k += 1
                cache["_hash"] = (k, hashes)
                _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
                prefix = self.char_prefix
                chars = prefix[n:] - prefix[: len(prefix) - n]
                cache[n] = (counts[inverse], chars)
        return cache[n]


def _duplicates(items: list[str]) -> tuple[float, float]:
    """(fraction of items equal to an earlier one, fraction of all characters in such items)."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_items = dup_chars = total_chars = 0
    for item in items:
        total_chars += len(item)
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup_items / len(items), (dup_chars / total_chars if total_chars else 0.0)


def word_count(doc: Doc, p) -> bool:
    return p.min <= len(doc.words) <= p.max


def mean_word_length(doc: Doc, p) -> bool:
    lengths = [len(w) for w in doc.bare_words if w]
    if not lengths:
        return False
    return p.min <= sum(lengths) / len(lengths) <= p.max


def symbol_ratio(doc: Doc, p) -> bool:
    n = len(doc.words)
    if not n:
        return False
    hashes = doc.text.count("#")
    ellipses = sum(doc.text.count(e) for e in ELLIPSES)
    return hashes / n <= p.max and ellipses / n <= p.max


def alphabetic_words(doc: Doc, p) -> bool:
    n = len(doc.words)
    if not n:
        return False
    return 1 - len(_no_letter_word().findall(doc.text)) / n >= p.min


@lru_cache(maxsize=1)
def _no_letter_word():
    """A whitespace-separated word without any letter (Unicode category L, as str.isalpha)."""
    import regex

    return regex.compile(r"(?<!\S)[^\s\p{L}]+(?!\S)")


def stop_words(doc: Doc, p) -> bool:
    wanted = set(p.words)
    found = wanted.intersection(w.casefold() for w in doc.bare_words)
    return len(found) >= p.min


def bullet_lines(doc: Doc, p) -> bool:
    lines = doc.lines
    return not lines or sum(1 for line in lines if line.startswith(BULLETS)) / len(lines) <= p.max


def ellipsis_lines(doc: Doc, p) -> bool:
    lines = doc.lines
    return not lines or sum(1 for line in lines if line.endswith(ELLIPSES)) / len(lines) <= p.max


def script_fraction(text: str, names) -> float:
    """Of all letters in `text`, the fraction that belong to the Unicode script(s) `names`."""
    import regex

    letters = sum(map(len, regex.findall(r"\p{L}+", text)))
    if not letters:
        return 0.0
    pattern = "(?V1)[\\p{L}&&[" + "".join(f"\\p{{Script={name}}}" for name in names) + "]]+"
    return sum(map(len, regex.findall(pattern, text))) / letters


def script(doc: Doc, p) -> bool:
    return script_fraction(doc.text, p.name) >= p.min


def duplicate_lines(doc: Doc, p) -> bool:
    frac, char_frac = _duplicates(doc.lines)
    return frac <= p.max_fraction and char_frac <= p.max_char_fraction


def duplicate_paragraphs(doc: Doc, p) -> bool:
    frac, char_frac = _duplicates(doc.paragraphs)
    return frac <= p.max_fraction and char_frac <= p.max_char_fraction


def top_ngram_fraction(doc: Doc, n: int) -> float:
    total = int(doc.char_prefix[-1])
    counts, chars = doc.ngram_counts(n)
    if not total or not len(counts) or counts.max() < 2:
        return 0.0
    top = counts.max()
    return float(top * chars[counts == top].max()) / total


def duplicate_ngram_fraction(doc: Doc, n: int) -> float:
    total = int(doc.char_prefix[-1])
    counts, _ = doc.ngram_counts(n)
    if not total or not len(counts):
        return 0.0
    starts = np.flatnonzero(counts >= 2)
    if not len(starts):
        return 0.0
    w = len(doc.words)
    # +1 at each repeated n-gram's first word, -1 after its last: covered words have a positive sum.
    edges = np.bincount(starts, minlength=w + 1) - np.bincount(starts + n, minlength=w + 1)
    covered = np.cumsum(edges[:w]) > 0
    lengths = np.diff(doc.char_prefix)
    return float(lengths[covered].sum()) / total


def top_ngrams(doc: Doc, p) -> bool:
    return all(top_ngram_fraction(doc, n) <= limit for n, limit in p.max_char_fraction.items())


def duplicate_ngrams(doc: Doc, p) -> bool:
    limits = sorted(p.max_char_fraction.items())
    for i, (n, limit) in enumerate(limits):
        frac = duplicate_ngram_fraction(doc, n)
        if frac > limit:
            return False
        # Longer n-grams cover no more than shorter ones (a repeated (n+1)-gram holds repeated
        # n-grams over the same words): under every remaining limit, all remaining rules pass.
        if frac <= min(lim for _, lim in limits[i:]):
            return True
    return True


RULES = {
    "word_count": word_count,
    "mean_word_length": mean_word_length,
    "symbol_ratio": symbol_ratio,
    "alphabetic_words": alphabetic_words,
    "stop_words": stop_words,
    "bullet_lines": bullet_lines,
    "ellipsis_lines": ellipsis_lines,
    "script": script,
    "duplicate_lines": duplicate_lines,
    "duplicate_paragraphs": duplicate_paragraphs,
    "top_ngrams": top_ngrams,
    "duplicate_ngrams": duplicate_ngrams,
}
assert list(RULES) == list(FILTERS)


class QualityFilter:
    """The enabled rules (settings.CleanSettings.filters), in FILTERS order, with drop counts."""

    def __init__(self, filters: dict):
        self.rules = [(name, RULES[name], params) for name, params in filters.items()]
        self.dropped: Counter = Counter({name: 0 for name in filters})

    def first_failure(self, text: str) -> str | None:
        """The name of the first rule `text` fails, or None when it passes them all."""
        doc = Doc(text)
        for name, rule, params in self.rules:
            if not rule(doc, params):
                return name
        return None

    def keep(self, text: str) -> bool:
        failed = self.first_failure(text)
        if failed is None:
            return True
        self.dropped[failed] += 1
        return False
