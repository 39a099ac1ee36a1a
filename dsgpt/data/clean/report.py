"""What prepare tells the user about the data: report.json, its printed summary, a length histogram.

Document lengths are counted in tokens, without the EOS that follows each document, in a
Counter of length -> documents (memory grows with the number of distinct lengths, not with the
corpus). From it, exactly: percentiles (nearest rank: the smallest length L such that at least
q% of documents have length <= L), a histogram over power-of-two bins, and for each candidate
block size B the fraction of tokens whose position in their document is >= B: the tokens that
have more in-document context before them than a B-token window can show.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

DEFAULT_BLOCK_SIZES = (128, 256, 512, 1024, 2048)
PERCENTILES = (1, 10, 25, 50, 75, 90, 99)
REPORT_FILE = "report.json"
HISTOGRAM_FILE = "lengths.png"
REPORT_VERSION = 1


def length_stats(lengths: Counter, block_sizes=DEFAULT_BLOCK_SIZES) -> dict:
    """Percentiles, histogram and context fractions of a Counter {length in tokens: documents}."""
    items = sorted((int(k), int(v)) for k, v in lengths.items() if v)
    n_docs = sum(v for _, v in items)
    n_tokens = sum(k * v for k, v in items)
    out = {"documents": n_docs, "tokens": n_tokens, "eos_counted": False}
    if not n_docs:
        return out
    out["min"], out["max"] = items[0][0], items[-1][0]
    out["mean"] = round(n_tokens / n_docs, 3)
    out["percentiles"] = {str(q): _nearest_rank(items, n_docs, q) for q in PERCENTILES}
    out["histogram"] = _histogram(items)
    out["context_beyond_block"] = {
        str(b): (sum((k - b) * v for k, v in items if k > b) / n_tokens if n_tokens else 0.0) for b in block_sizes
    }
    return out


def _nearest_rank(items, n_docs: int, q: float) -> int:
    rank = max(1, math.ceil(q / 100 * n_docs))
    seen = 0
    for length, count in items:
        seen += count
        if seen >= rank:
            return length
    return items[-1][0]


def _histogram(items) -> dict:
    """Documents per bin [0, 1), [1, 2), [2, 4), [4, 8), ...: edges up to past the longest."""
    top = items[-1][0]
    edges = [0, 1]
    while edges[-1] <= top:
        edges.append(edges[-1] * 2)
    counts = [0] * (len(edges) - 1)
    for length, count in items:
        counts[0 if length == 0 else length.bit_length()] += count
    return {"edges": edges, "counts": counts}


def build_report(cleaning: dict, lengths: Counter, block_sizes, memory: dict, split: dict) -> dict:
    return {
        "report_version": REPORT_VERSION,
        "cleaning": cleaning,
        "dedup_memory": memory,
        "split": split,
        "lengths": length_stats(lengths, block_sizes),
    }


def write_histogram(report: dict, path: Path, block_sizes) -> bool:
    """lengths.png: documents per length bin (log x), with the candidate block sizes marked.
    False when matplotlib is not installed (the numbers are in report.json either way)."""
    stats = report["lengths"]
    if not stats.get("documents"):
        return False
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker.FuncFormatter below)

    edges, counts = stats["histogram"]["edges"], stats["histogram"]["counts"]
    used = [i for i, c in enumerate(counts) if c]
    first, last = used[0], used[-1]
    lefts = [max(e, 0.5) for e in edges[first : last + 1]]
    rights = edges[first + 1 : last + 2]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(lefts, counts[first : last + 1], width=[r - l for l, r in zip(lefts, rights)], align="edge",
           edgecolor="black", linewidth=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(lefts[0], *block_sizes) / 1.5, max(rights[-1], *block_sizes) * 1.5)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.0f}" if x >= 1 else f"{x:g}"))
    top = max(counts)
    for b in block_sizes:
        ax.axvline(b, color="red", linestyle="--", linewidth=0.8)
        frac = stats["context_beyond_block"][str(b)]
        ax.text(b, top * 1.02, f"{frac:.0%}", color="red", fontsize=7, ha="center", va="bottom")
    ax.set_ylim(0, top * 1.12)
    ax.set_xlabel("document length in tokens (bins [2^k, 2^(k+1)))")
    ax.set_ylabel("documents")
    ax.set_title(f"{stats['documents']:,} documents, median {stats['percentiles']['50']:,} tokens; red: candidate "
                 "block sizes and the share of tokens at a position beyond them", fontsize=9)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)
    return True


def read_report(data_dir) -> dict | None:
    path = Path(data_dir).expanduser() / REPORT_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def summary_lines(report: dict) -> list[str]:
    """The report as a few lines of text (what prepare prints and inspect prints again)."""
    c = report["cleaning"]
    lines = []
    if c["stages"]:
        lines.append(f"cleaning ({' -> '.join(c['stages'])}): kept {c['documents_kept']:,} of "
                     f"{c['documents_read']:,} documents, dropped {c['documents_dropped']:,}")
    else:
        lines.append(f"cleaning: off ({c['documents_read']:,} documents read)")
    if "quality_filters" in c:
        dropped = c["quality_filters"]["dropped"]
        lines.append("  quality filters dropped: " + (", ".join(f"{k} {v:,}" for k, v in dropped.items()) or "-"))
    if "pii" in c:
        found = c["pii"]["replaced"]
        lines.append("  PII replaced: " + ", ".join(f"{k} {v:,}" for k, v in found.items())
                     + f"; {c['pii']['documents_changed']:,} document(s) changed")
    if "exact_dedup" in c:
        lines.append(f"  exact duplicates removed: {c['exact_dedup']['removed']:,}")
    if "near_dedup" in c:
        n = c["near_dedup"]
        lines.append(f"  near duplicates removed: {n['removed']:,} (Jaccard >= {n['threshold']}, "
                     f"{n['shingle_words']}-word shingles, {n['num_perm']} permutations, {n['bands']} bands)")
    for name, mem in report.get("dedup_memory", {}).items():
        lines.append(f"  {name.replace('_', ' ')} state: {mem['bytes'] / 2**20:.1f} MiB "
                     f"({mem['bytes_per_kept_document']:,} bytes per kept document)")
    s = report["lengths"]
    if s.get("documents"):
        p = s["percentiles"]
        lines.append(f"document length in tokens: mean {s['mean']:,.1f}, min {s['min']:,}, "
                     + ", ".join(f"p{q} {p[q]:,}" for q in p) + f", max {s['max']:,}")
        lines.append("tokens with more in-document context than the block shows: "
                     + ", ".join(f"{b}: {f:.1%}" for b, f in s["context_beyond_block"].items()))
    return lines
