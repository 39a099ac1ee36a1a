"""Preparation throughput: `dsgpt prepare` with each cleaning stage on and off, against the raw
`tokenizers` batch-encode rate, and peak memory at 1x and 10x corpus size.

    python bench/prepare_throughput.py                      # 1x = 25 MB, 10x = 250 MB
    python bench/prepare_throughput.py --mb 5 --no-record   # a quick look

The corpus is built here, without downloads: the Python sources of this interpreter's standard
library, then of its site-packages, in sorted order, cut at line ends into documents of at most
4,000 characters (JSONL). One BPE (vocab --vocab) is trained on the first 1x once and given to every
run, so the timings are of the encoding pass: reading, cleaning, encoding, writing shards, the report.

Each measurement runs in its own process (a clean peak RSS: ru_maxrss). MB/s counts the corpus's
UTF-8 text bytes (all of them, also those that cleaning drops) per second of the whole prepare call;
tokens/s counts the tokens written (EOS not counted). "raw tokenizers" is `encode_batch_fast` over
the same documents already in memory, in prepare's batches: no reading, no writing. Each figure is
the best of --repeats runs (other jobs on the machine only slow runs down).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402  (after the path: runs as a script from any directory)

SECTION = "Preparation throughput (bench/prepare_throughput.py)"
COLUMNS = ["date", "machine", "corpus", "stages", "MB/s", "tokens/s", "x raw tokenizers", "docs kept",
           "peak RSS GB", "dedup bytes/kept doc", "versions", "command"]
DOC_CHARS = 4000
# name -> clean_settings keyword arguments (None: the raw tokenizer, no prepare)
CONFIGS = {
    "raw tokenizers": None,
    "prepare, cleaning off": {},
    "quality filters (Gopher)": {"gopher": True},
    "PII": {"pii": True},
    "exact dedup": {"config": {"dedup": {"exact": True}}},
    "near dedup": {"config": {"dedup": {"near": True}}},
    "all stages": {"gopher": True, "pii": True, "dedup": True},
}
AT_10X = ("raw tokenizers", "prepare, cleaning off", "all stages")


def source_files() -> list[Path]:
    files, seen = [], set()
    for key in ("stdlib", "purelib"):
        root = Path(sysconfig.get_paths()[key])
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__"
                                 and not (key == "stdlib" and d == "site-packages"))
            found += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
        for path in sorted(found, key=lambda p: p.relative_to(root).as_posix()):
            real = path.resolve()
            if real not in seen:
                seen.add(real)
                files.append(path)
    return files


def build_corpus(path: Path, limit_bytes: int) -> tuple[int, int]:
    """Write documents of the local Python sources to `path` (JSONL) until `limit_bytes` of text;
    returns (documents, text bytes)."""
    n_docs = total = 0
    with open(path, "w", encoding="utf-8") as out:
        for file in source_files():
            text = file.read_text(encoding="utf-8", errors="replace")
            doc, size = [], 0
            for line in text.splitlines(keepends=True):
                if size + len(line) > DOC_CHARS and doc:
                    n_docs, total = _emit(out, "".join(doc), n_docs, total)
                    doc, size = [], 0
                doc.append(line)
                size += len(line)
            if doc:
                n_docs, total = _emit(out, "".join(doc), n_docs, total)
            if total >= limit_bytes:
                break
    return n_docs, total


def _emit(out, doc: str, n_docs: int, total: int) -> tuple[int, int]:
    if doc.strip():
        out.write(json.dumps({"text": doc}) + "\n")
        return n_docs + 1, total + len(doc.encode("utf-8"))
    return n_docs, total


def child(name: str, corpus: str, tokenizer: str, work: str) -> dict:
    """One measurement in this process: seconds, tokens, documents kept, peak RSS, dedup memory."""
    if CONFIGS[name] is None:
        from dsgpt.data.prepare import _batches
        from dsgpt.data.sources import iter_documents
        from dsgpt.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
        docs = list(iter_documents([corpus]))
        start = time.perf_counter()
        tokens = 0
        for batch, _ in _batches(docs):
            tokens += sum(len(e.ids) for e in tok.encode_batch_fast(batch, add_special_tokens=False))
        seconds = time.perf_counter() - start
        kept, memory = len(docs), {}
    else:
        from dsgpt.data.clean import clean_settings
        from dsgpt.data.prepare import prepare

        settings = clean_settings(**CONFIGS[name])
        out = Path(work) / "out"
        start = time.perf_counter()
        prepare([corpus], out, tokenizer=tokenizer, clean=settings, progress=False, overwrite=True)
        seconds = time.perf_counter() - start
        report = json.loads((out / "report.json").read_text())
        tokens, kept, memory = report["lengths"]["tokens"], report["cleaning"]["documents_kept"], report["dedup_memory"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    return {"seconds": seconds, "tokens": tokens, "kept": kept, "peak_gb": peak, "dedup": memory}


def run_child(name: str, corpus: Path, tokenizer: Path, work: Path, env: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--corpus", str(corpus),
           "--tokenizer", str(tokenizer), "--work", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=25.0, help="1x corpus size in MB of text (default 25)")
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    p.add_argument("--repeats", type=int, default=2, help="runs per figure, the best kept (default 2)")
    p.add_argument("--no-10x", action="store_true", help="skip the 10x corpus")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.corpus, args.tokenizer, args.work)))
        return 0

    from dsgpt.data.sources import iter_documents
    from dsgpt.data.tokenizer import train_bpe

    command = "python bench/prepare_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    date, machine, versions = common.context_cells()
    versions = ", ".join(f"{n} {metadata.version(n)}" for n in ("tokenizers", "datasketch", "numpy")) + \
        f", Python {sys.version.split()[0]}"
    sizes = [("1x", 1)] + ([] if args.no_10x else [("10x", 10)])
    env = common.child_env()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpora = {}
        for label, factor in sizes:
            path = tmp / f"corpus_{label}.jsonl"
            n_docs, n_bytes = build_corpus(path, int(args.mb * factor * 1e6))
            corpora[label] = (path, n_docs, n_bytes)
            print(f"corpus {label}: {n_docs:,} documents, {n_bytes / 1e6:.1f} MB", flush=True)
        tok = train_bpe(iter_documents([str(corpora["1x"][0])]), args.vocab, sample_bytes=20_000_000)
        tok_path = tmp / "tokenizer.json"
        tok.save(str(tok_path))
        print(f"{'corpus':<5} {'stages':<26} {'MB/s':>7} {'tokens/s':>11} {'x raw':>6} {'kept':>8} "
              f"{'peak GB':>8} {'dedup B/doc':>12}", flush=True)
        for label, factor in sizes:
            path, n_docs, n_bytes = corpora[label]
            names = list(CONFIGS) if factor == 1 else list(AT_10X)
            best: dict = {}
            for _ in range(max(1, args.repeats)):  # interleaved: a busy moment hits every config alike
                for name in names:
                    r = run_child(name, path, tok_path, tmp, env)
                    peak = max(r["peak_gb"], best[name]["peak_gb"]) if name in best else r["peak_gb"]
                    if name not in best or r["seconds"] < best[name]["seconds"]:
                        best[name] = r
                    best[name]["peak_gb"] = peak  # the highest of the runs
            raw_rate = n_bytes / best["raw tokenizers"]["seconds"]
            for name in names:
                r = best[name]
                mbs = n_bytes / r["seconds"] / 1e6
                dedup = ", ".join(f"{k.split('_')[0]} {v['bytes_per_kept_document']:,}" for k, v in r["dedup"].items())
                cells = [f"{mbs:,.2f}", f"{r['tokens'] / r['seconds']:,.0f}", f"{n_bytes / r['seconds'] / raw_rate:.2f}",
                         f"{r['kept']:,} of {n_docs:,}", f"{r['peak_gb']:.2f}", dedup or "-"]
                print(f"{label:<5} {name:<26} {cells[0]:>7} {cells[1]:>11} {cells[2]:>6} {r['kept']:>8,} "
                      f"{cells[4]:>8} {cells[5]:>12}", flush=True)
                if not args.no_record:
                    corpus_cell = (f"{label}: {n_bytes / 1e6:.0f} MB, {n_docs:,} docs of Python sources, "
                                   f"BPE vocab {args.vocab}")
                    common.append_row(SECTION, COLUMNS, [date, machine, corpus_cell, name, *cells, versions,
                                                         f"`{command.strip()}`"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
