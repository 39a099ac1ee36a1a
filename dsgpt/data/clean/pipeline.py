"""The cleaning stages composed in their fixed order: quality filters -> PII scrubbing -> exact
dedup -> near dedup. One Cleaner reads one pass over the documents and counts what each stage did."""

from __future__ import annotations

import time
from typing import Iterable, Iterator

from dsgpt.data.clean.dedup import ExactDedup, NearDedup, normalize
from dsgpt.data.clean.filters import QualityFilter
from dsgpt.data.clean.pii import Scrubber
from dsgpt.data.clean.settings import CleanSettings


class Cleaner:
    """`run(documents)` yields the documents that survive every enabled stage, scrubbed; the
    counters (n_read, n_kept, filters.dropped, scrub.found, exact.removed, near.removed) and the
    seconds spent per stage fill in as it goes. A fresh Cleaner per pass: dedup is stateful."""

    def __init__(self, settings: CleanSettings):
        self.settings = settings
        self.filters = QualityFilter(settings.filters) if settings.filters else None
        self.scrub = Scrubber(settings.pii) if settings.pii else None
        self.exact = ExactDedup() if settings.exact_dedup else None
        near = settings.near_dedup
        self.near = NearDedup(near.threshold, near.num_perm, near.shingle_words, near.seed) if near else None
        self.n_read = 0
        self.n_kept = 0
        self.seconds = dict.fromkeys(settings.stages(), 0.0)

    def run(self, documents: Iterable[str]) -> Iterator[str]:
        clock = time.perf_counter
        filters, scrub, exact, near, seconds = self.filters, self.scrub, self.exact, self.near, self.seconds
        for text in documents:
            self.n_read += 1
            if filters is not None:
                t = clock()
                keep = filters.keep(text)
                seconds["quality_filters"] += clock() - t
                if not keep:
                    continue
            if scrub is not None:
                t = clock()
                text = scrub(text)
                seconds["pii"] += clock() - t
            if exact is not None or near is not None:
                t = clock()
                normalized = normalize(text)
                if exact is not None:
                    duplicate = exact.is_duplicate(normalized)
                    t2 = clock()
                    seconds["exact_dedup"] += t2 - t
                    t = t2
                    if duplicate:
                        continue
                if near is not None:
                    duplicate = near.is_duplicate(normalized)
                    seconds["near_dedup"] += clock() - t
                    if duplicate:
                        continue
            self.n_kept += 1
            yield text

    def counts(self) -> dict:
        """What each stage did, for the report (deterministic: no timings)."""
        out = {"documents_read": self.n_read, "documents_kept": self.n_kept,
               "documents_dropped": self.n_read - self.n_kept, "stages": self.settings.stages()}
        if self.filters is not None:
            out["quality_filters"] = {
                "dropped": dict(self.filters.dropped),
                "settings": self.settings.to_dict()["filters"],
                "rule": "a document is counted under the first rule it fails, in this order",
            }
        if self.scrub is not None:
            out["pii"] = {"replaced": dict(self.scrub.found), "documents_changed": self.scrub.documents_changed}
        if self.exact is not None:
            out["exact_dedup"] = {
                "removed": self.exact.removed,
                "normalization": "Unicode NFKC, case folding, whitespace runs as one space, ends stripped",
                "hash": "BLAKE2b, 16 bytes",
            }
        if self.near is not None:
            n = self.near
            out["near_dedup"] = {
                "removed": n.removed, "threshold": n.threshold, "num_perm": n.num_perm,
                "shingle_words": n.shingle_words, "bands": n.bands, "rows_per_band": n.rows,
            }
        return out

    def memory(self) -> dict:
        """Bytes the dedup stages hold at the end, in all and per kept document."""
        out = {}
        for name, stage in (("exact_dedup", self.exact), ("near_dedup", self.near)):
            if stage is not None:
                total = stage.state_bytes()
                out[name] = {"bytes": total, "bytes_per_kept_document": round(total / max(stage.n_kept, 1))}
        return out
