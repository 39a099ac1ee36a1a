"""Tests for dsgpt.data: sources, tokenizer, prepare, the built-in corpus, TokenData, CLI."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dsgpt.cli import main
from dsgpt.data import builtin
from dsgpt.data.dataset import TokenData
from dsgpt.data.prepare import data_hash, in_val, prepare, token_dtype
from dsgpt.data.sources import iter_documents
from dsgpt.data.tokenizer import EOS_TOKEN, eos_id, load_tokenizer, tokenizer_hash, train_bpe
from dsgpt.errors import UserError

VOCAB = 300
WORDS = ("the cat sat on a mat while dogs ran über straße 日本語 naïve café "
         "def return import class lambda 🙂 tabs\tand\nnewlines  spaces").split(" ")


def make_docs(n: int, seed: int = 0, words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, words))) for _ in range(n)]


DOCS = make_docs(40)


def write_txt(folder: Path, docs: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        paths.append(folder / f"doc_{i:03d}.txt")
        paths[-1].write_text(doc, encoding="utf-8")
    return paths


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, field: doc}) + "\n")
            if i == 3:
                f.write("\n")  # blank lines are skipped
    return path


def split_docs(docs: list[str], seed: int, frac: float) -> tuple[list[str], list[str]]:
    """What prepare should put in train and val (the hash split plus the last-document rule)."""
    train = [d for i, d in enumerate(docs[:-1]) if not in_val(seed, i, frac)]
    val = [d for i, d in enumerate(docs[:-1]) if in_val(seed, i, frac)]
    last = docs[-1]
    if not val:
        val.append(last)
    elif not train:
        train.append(last)
    else:
        (val if in_val(seed, len(docs) - 1, frac) else train).append(last)
    return train, val


def read_split(out: Path, split: str) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    parts = [np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in meta[f"{split}_shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=meta["dtype"])


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ---- sources ----------------------------------------------------------------------------------


def test_folder_is_recursive_sorted_and_skips_other_files(tmp_path):
    root = tmp_path / "corpus"
    (root / "b" / "c").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "z.txt").write_text("zed")
    (root / "a.md").write_text("alpha")
    (root / "b" / "c" / "deep.txt").write_text("deep")
    (root / "b" / "empty.txt").write_text("")
    (root / "notes.log").write_text("ignored")
    (root / ".hidden" / "x.txt").write_text("ignored")
    write_jsonl(root / "b" / "j.jsonl", ["from jsonl"])
    assert list(iter_documents([str(root)])) == ["alpha", "deep", "from jsonl", "zed"]


def test_jsonl_parquet_and_saved_dataset_sources(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = DOCS[:20]
    assert list(iter_documents([str(write_jsonl(tmp_path / "d.jsonl", docs, "body"))], "body")) == docs
    pq.write_table(pa.table({"text": docs, "n": list(range(20))}), tmp_path / "d.parquet", row_group_size=7)
    assert pq.ParquetFile(tmp_path / "d.parquet").num_row_groups == 3
    assert list(iter_documents([str(tmp_path / "d.parquet")])) == docs
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents([str(tmp_path / "ds")])) == docs
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["no"]}),
                               "train": datasets.Dataset.from_dict({"text": docs})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert list(iter_documents([str(tmp_path / "dd")])) == docs


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved"])
def test_missing_text_field_names_file_and_keys(tmp_path, kind):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text('{"text": "ok"}\n{"body": "x", "id": 2}\n')
        expect = [str(path), "line 2", "body, id", "--text-field"]
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.table({"body": ["x"]}), path)
        expect = [str(path), "body", "--text-field"]
    else:
        path = tmp_path / "ds"
        datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(path))
        expect = [str(path), "body", "--text-field"]
    with pytest.raises(UserError) as err:
        list(iter_documents([str(path)]))
    for part in expect:
        assert part in str(err.value)


def test_bad_inputs_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        list(iter_documents([str(tmp_path / "nope.txt")]))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="unsupported file type"):
        list(iter_documents([str(tmp_path / "x.csv")]))
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(UserError, match="line 1 is not valid JSON"):
        list(iter_documents([str(tmp_path / "bad.jsonl")]))
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    with pytest.raises(UserError, match="not valid UTF-8"):
        list(iter_documents([str(tmp_path / "latin.txt")]))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UserError, match="no usable files"):
        list(iter_documents([str(tmp_path / "emptydir")]))


# ---- tokenizer --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tok():
    return train_bpe(iter(DOCS), VOCAB)


def test_train_bpe_is_byte_level_with_eos(tok):
    assert tok.get_vocab_size() == VOCAB
    assert tok.token_to_id(EOS_TOKEN) == eos_id(tok)
    text = "never seen: ΩΨ ⚙ \x00 end"  # bytes outside the sample still encode and round-trip
    assert tok.decode(tok.encode(text).ids) == text
    assert tokenizer_hash(tok) == tokenizer_hash(train_bpe(iter(DOCS), VOCAB))
    with pytest.raises(UserError, match="too small"):
        train_bpe(iter(DOCS), 100)


def test_train_bpe_reads_a_bounded_sample():
    seen = []

    def docs():
        for i in range(10_000):
            seen.append(i)
            yield "x" * 1000

    train_bpe(docs(), VOCAB, sample_bytes=5_000)
    assert len(seen) <= 7


def test_eos_lookup_and_tokenizer_loading_errors(tmp_path):
    from tokenizers import Tokenizer, models

    with_s = Tokenizer(models.WordLevel({"a": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    assert eos_id(with_s) == 1
    assert eos_id(with_s, preferred="a") == 0
    none = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    with pytest.raises(UserError, match="no end-of-text token"):
        eos_id(none)
    (tmp_path / "tokdir").mkdir()
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "tokdir")
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")


# ---- prepare ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def txt_files(tmp_path_factory):
    return write_txt(tmp_path_factory.mktemp("txt"), DOCS)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, txt_files):
    out = tmp_path_factory.mktemp("prep") / "data"
    prepare([str(p) for p in txt_files], out, vocab_size=VOCAB, val_fraction=0.2, seed=7,
            shard_tokens=700, progress=False)
    return out


def test_prepare_txt_round_trips_with_eos(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    tok = load_tokenizer(prepared)
    assert meta["eos_id"] == tok.token_to_id(EOS_TOKEN)
    train_docs, val_docs = split_docs(DOCS, 7, 0.2)
    assert train_docs and val_docs
    for split, docs in (("train", train_docs), ("val", val_docs)):
        ids = read_split(prepared, split)
        assert ids[-1] == meta["eos_id"] and (ids == meta["eos_id"]).sum() == len(docs)
        text = tok.decode(ids.tolist(), skip_special_tokens=False)
        assert text == "".join(d + EOS_TOKEN for d in docs)
    assert meta["n_documents"] == len(DOCS)
    assert (meta["n_train_documents"], meta["n_val_documents"]) == (len(train_docs), len(val_docs))


def test_meta_matches_files(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == VOCAB
    assert len(meta["train_shards"]) > 2  # shard_tokens=700 forces several shards
    for split in ("train", "val"):
        total = 0
        for shard in meta[f"{split}_shards"]:
            data = (prepared / shard["file"]).read_bytes()
            assert len(data) == shard["n_tokens"] * 2
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            assert shard["n_tokens"] <= 700
            total += shard["n_tokens"]
        assert total == meta[f"n_{split}_tokens"]
    assert meta["data_sha256"] == data_hash(meta["train_shards"] + meta["val_shards"])
    tok_bytes = (prepared / "tokenizer.json").read_bytes()
    assert meta["tokenizer_sha256"] == hashlib.sha256(tok_bytes).hexdigest()
    assert meta["tokenizer_sha256"] == tokenizer_hash(load_tokenizer(prepared / "tokenizer.json"))
    assert {"format_version", "seed", "val_fraction", "inputs"} <= set(meta)
    assert sorted(p.name for p in prepared.iterdir()) == sorted(
        ["meta.json", "tokenizer.json", "report.json", "lengths.png"]
        + [s["file"] for s in meta["train_shards"] + meta["val_shards"]]
    )


def test_prepare_is_deterministic(tmp_path, txt_files, prepared):
    out = tmp_path / "again"
    prepare([str(p) for p in txt_files], out, vocab_size=VOCAB, val_fraction=0.2, seed=7,
            shard_tokens=700, progress=False)
    for path in prepared.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    other = prepare([str(p) for p in txt_files], tmp_path / "seed8", vocab_size=VOCAB,
                    val_fraction=0.2, seed=8, progress=False)
    assert other["data_sha256"] != json.loads((prepared / "meta.json").read_text())["data_sha256"]


@pytest.mark.parametrize("kind", ["folder", "jsonl", "parquet", "saved"])
def test_prepare_other_formats_gives_same_tokens(tmp_path, kind, txt_files, prepared):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "folder":
        src = txt_files[0].parent
    elif kind == "jsonl":
        src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    elif kind == "parquet":
        src = tmp_path / "d.parquet"
        pq.write_table(pa.table({"text": DOCS}), src, row_group_size=9)
    else:
        src = tmp_path / "ds"
        datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(src))
    meta = prepare([str(src)], tmp_path / "out", vocab_size=VOCAB, val_fraction=0.2, seed=7,
                   shard_tokens=700, progress=False)
    assert meta["data_sha256"] == json.loads((prepared / "meta.json").read_text())["data_sha256"]


def test_single_document_still_gets_a_val_split(tmp_path):
    doc = " ".join(DOCS)
    (tmp_path / "book.txt").write_text(doc)
    meta = prepare([str(tmp_path / "book.txt")], tmp_path / "out", vocab_size=VOCAB,
                   val_fraction=0.1, progress=False)
    assert meta["split_method"] == "single_document_tail" and meta["n_val_tokens"] > 0
    tok = load_tokenizer(tmp_path / "out")
    ids = np.concatenate([read_split(tmp_path / "out", "train"), read_split(tmp_path / "out", "val")])
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == doc + EOS_TOKEN


def test_token_dtype_choice_and_uint32_shards(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    assert token_dtype(300) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    # A word-level tokenizer with 70k entries: big vocab without training one.
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab.update({EOS_TOKEN: 70_000, "[UNK]": 70_001})
    big = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    big.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big.save(str(tmp_path / "big.json"))
    docs = ["w69999 w1 w65536", "w2 w3", "w65535 w0"]
    write_jsonl(tmp_path / "d.jsonl", docs)
    meta = prepare([str(tmp_path / "d.jsonl")], tmp_path / "out", tokenizer=str(tmp_path / "big.json"),
                   val_fraction=0.3, progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002 and meta["eos_id"] == 70_000
    ids = np.concatenate([read_split(tmp_path / "out", "train"), read_split(tmp_path / "out", "val")])
    assert sorted(ids.tolist()) == sorted([69999, 1, 65536, 70000, 2, 3, 70000, 65535, 0, 70000])
    data = TokenData(tmp_path / "out", block_size=2, seed=0)
    assert data.train_micro_batches(0, 0, 1, 2, 1)[0][0].max() <= 70_000


def test_prepare_with_hf_tokenizer_dir_and_cli(tmp_path, tok, txt_files, capsys):
    from transformers import PreTrainedTokenizerFast

    hf_dir = tmp_path / "hf_tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN).save_pretrained(str(hf_dir))
    ref = prepare([str(txt_files[0].parent)], tmp_path / "ref", tokenizer=str(hf_dir), progress=False)
    rc = main(["prepare", "--input", str(txt_files[0].parent), "--out", str(tmp_path / "cli"),
               "--tokenizer", str(hf_dir), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "cli") in out and f"{ref['n_train_tokens']:,}" in out
    meta = json.loads((tmp_path / "cli" / "meta.json").read_text())
    assert meta["eos_id"] == tok.token_to_id(EOS_TOKEN) and meta["vocab_size"] == VOCAB
    assert meta["data_sha256"] == ref["data_sha256"]
    # Same tokenizer, same documents: the ids equal those of a tokenizer used in memory.
    expected = [i for d in DOCS for i in tok.encode(d).ids + [meta["eos_id"]]]
    got = np.concatenate([read_split(tmp_path / "cli", "train"), read_split(tmp_path / "cli", "val")])
    assert sorted(got.tolist()) == sorted(expected)


# ---- prepare errors: a UserError and nothing left behind ---------------------------------------


def test_prepare_errors_leave_nothing_behind(tmp_path, txt_files):
    out = tmp_path / "out"
    inputs = [str(p) for p in txt_files]
    cases = [
        ([str(tmp_path / "missing.txt")], dict(vocab_size=VOCAB), "missing.txt"),
        (inputs, dict(vocab_size=VOCAB, tokenizer="x"), "both were given"),
        (inputs, dict(), "neither was given"),
        (inputs, dict(vocab_size=VOCAB, val_fraction=0.0), "val_fraction"),
        (inputs, dict(tokenizer=str(tmp_path / "no_tok")), "no_tok"),
    ]
    (tmp_path / "empty.txt").write_text("")
    cases.append(([str(tmp_path / "empty.txt")], dict(vocab_size=VOCAB), "no documents"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    cases.append(([str(bad)], dict(vocab_size=VOCAB), "line 2"))
    for ins, kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            prepare(ins, out, progress=False, **kwargs)
        assert not out.exists(), message
        assert leftovers(tmp_path) == [], message


def test_existing_out_dir_is_kept_unless_overwrite(tmp_path, txt_files):
    inputs = [str(p) for p in txt_files[:10]]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="already exists"):
        prepare(inputs, out, vocab_size=VOCAB, progress=False)
    with pytest.raises(UserError, match="not a dsgpt data directory"):
        prepare(inputs, out, vocab_size=VOCAB, progress=False, overwrite=True)
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1
    (out / "keep.txt").unlink()
    first = prepare(inputs, out, vocab_size=VOCAB, progress=False)  # empty dir: fine
    with pytest.raises(UserError, match="--overwrite"):
        prepare(inputs[:5], out, vocab_size=VOCAB, progress=False)
    assert json.loads((out / "meta.json").read_text()) == first
    second = prepare(inputs[:5], out, vocab_size=VOCAB, progress=False, overwrite=True)
    assert json.loads((out / "meta.json").read_text()) == second != first
    assert leftovers(tmp_path) == []


def test_cli_user_error_prints_one_line_and_returns_2(tmp_path, capsys):
    rc = main(["prepare", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"),
               "--vocab-size", "300"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "nope.txt" in err and "Traceback" not in err
    assert main(["prepare", "--out", "x"]) == 2  # argparse: missing --input
    assert "required" in capsys.readouterr().err


def test_prepare_memory_is_flat_in_corpus_size(tmp_path, tok, monkeypatch):
    import tracemalloc

    from dsgpt.data import prepare as prep_mod

    monkeypatch.setattr(prep_mod, "_BATCH_BYTES", 32 << 10)
    tok.save(str(tmp_path / "tok.json"))
    peaks = []
    for n in (150, 300):
        path = write_jsonl(tmp_path / f"c{n}.jsonl", make_docs(n, seed=n, words=400))
        tracemalloc.start()
        prepare([str(path)], tmp_path / f"o{n}", tokenizer=str(tmp_path / "tok.json"), progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.3 * peaks[0], peaks


# ---- TokenData --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data(prepared):
    return TokenData(prepared, block_size=16, seed=3)


def cat(batches):
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_batches_shape_and_shift(data, prepared):
    batches = data.train_micro_batches(step=5, rank=0, world=1, micro_batch_size=4, grad_accum_steps=3)
    assert len(batches) == 3
    full = read_split(prepared, "train").astype(np.int64)
    starts = data.global_starts(5, 12)
    for i, (x, y) in enumerate(batches):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in range(4):
            s = int(starts[i * 4 + row])
            assert x[row].tolist() == full[s : s + 16].tolist()
            assert y[row].tolist() == full[s + 1 : s + 17].tolist()


def test_windows_cross_shard_boundaries(data, prepared):
    full = read_split(prepared, "train").astype(np.int64)
    boundary = int(data.train.ends[0])
    starts = np.array([boundary - 5, boundary - 1, 0, len(full) - 17])
    assert data.train.windows(starts, 17).tolist() == [full[s : s + 17].tolist() for s in starts]


def test_global_batch_is_independent_of_ranks_and_micro_steps(data):
    one = cat(data.train_micro_batches(9, 0, 1, 8, 1))
    ranks = [cat(data.train_micro_batches(9, r, 2, 4, 1)) for r in range(2)]
    assert torch.equal(one[0], torch.cat([ranks[0][0], ranks[1][0]]))
    assert torch.equal(one[1], torch.cat([ranks[0][1], ranks[1][1]]))
    gas = data.train_micro_batches(9, 0, 1, 4, 2)
    assert torch.equal(one[0], cat(gas)[0])
    four = [cat(data.train_micro_batches(9, r, 4, 1, 2)) for r in range(4)]
    assert torch.equal(one[0], torch.cat([f[0] for f in four]))


def test_batches_are_pure_functions_of_seed_and_step(data, prepared):
    a = cat(data.train_micro_batches(3, 1, 2, 4, 2))
    b = cat(data.train_micro_batches(3, 1, 2, 4, 2))
    fresh = cat(TokenData(prepared, block_size=16, seed=3).train_micro_batches(3, 1, 2, 4, 2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], fresh[0])
    assert not torch.equal(a[0], cat(data.train_micro_batches(4, 1, 2, 4, 2))[0])
    other_seed = TokenData(prepared, block_size=16, seed=4)
    assert not torch.equal(a[0], cat(other_seed.train_micro_batches(3, 1, 2, 4, 2))[0])
    assert len(data.train_micro_batches(10**12, 0, 1, 1, 1)) == 1  # any step >= 0


def test_val_batches_fixed_and_shared_between_ranks(data, prepared):
    full = read_split(prepared, "val").astype(np.int64)
    single = list(data.val_batches(n_windows=8, batch_size=2, rank=0, world=1))
    again = list(data.val_batches(n_windows=8, batch_size=2, rank=0, world=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(single, again))
    x1, y1 = cat(single)
    assert x1.shape == (8, 16) and torch.equal(x1[:, 1:], y1[:, :-1])
    rows = [full[s : s + 17].tolist() for s in data.val_starts(8)]
    assert torch.cat([x1, y1[:, -1:]], 1).tolist() == rows
    shares = [cat(list(data.val_batches(8, 2, r, 2))) for r in range(2)]
    assert torch.equal(x1, torch.cat([s[0] for s in shares]))
    # A huge request is capped by the val split; predicted tokens never overlap.
    starts = data.val_starts(10**6)
    assert len(starts) == (len(full) - 1) // 16 and np.all(np.diff(starts) >= 16)


def test_val_with_fewer_windows_than_ranks(tmp_path, txt_files):
    prepare([str(p) for p in txt_files[:4]], tmp_path / "d", vocab_size=VOCAB, val_fraction=0.01,
            progress=False)
    n_val = json.loads((tmp_path / "d" / "meta.json").read_text())["n_val_tokens"]
    data = TokenData(tmp_path / "d", block_size=n_val - 1, seed=0)
    shares = [list(data.val_batches(4, 4, r, 3)) for r in range(3)]
    # Every rank runs a forward (ZeRO-3 forwards are collective); only rank 0's window counts.
    assert [len(s) for s in shares] == [1, 1, 1]
    assert all(x.shape == (1, n_val - 1) for ((x, _),) in shares)
    assert (shares[0][0][1] >= 0).all()
    assert all((y == -100).all() for ((_, y),) in shares[1:])


def test_val_batches_equal_count_on_every_rank(data):
    for world in (2, 3, 5):
        counts = {len(list(data.val_batches(6, 2, r, world))) for r in range(world)}
        assert len(counts) == 1, (world, counts)


def test_token_data_errors_name_the_path(tmp_path, prepared):
    with pytest.raises(UserError, match="dsgpt prepare") as err:
        TokenData(tmp_path / "nope", block_size=8, seed=0)
    assert str(tmp_path / "nope") in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no meta.json"):
        TokenData(tmp_path / "empty", block_size=8, seed=0)
    n_val = json.loads((prepared / "meta.json").read_text())["n_val_tokens"]
    with pytest.raises(UserError, match="block_size") as err:
        TokenData(prepared, block_size=n_val, seed=0)
    assert str(prepared) in str(err.value) and "val split" in str(err.value)


# ---- built-in corpus ---------------------------------------------------------------------------


def test_builtin_file_list_is_deterministic_and_bounded():
    files = builtin.builtin_files()
    assert files == builtin.builtin_files() and len(files) > 20
    assert sum(f.stat().st_size for f in files) <= builtin.CORPUS_BYTES
    assert files[0].suffix == ".py"


def _ensure_in_child(out, files, marker, barrier):
    # Count real preparations through a wrapper installed in this (forked) child.
    original = builtin._prepare_corpus

    def counted(*args, **kwargs):
        with open(marker, "a") as f:
            f.write("prepared\n")
        return original(*args, **kwargs)

    builtin._prepare_corpus = counted
    barrier.wait()
    path = builtin.ensure_builtin(out, VOCAB, files=files)
    assert (path / "meta.json").is_file()


def test_ensure_builtin_prepares_once_across_processes(tmp_path):
    files = builtin.builtin_files()[:6]
    out, marker = tmp_path / "builtin", tmp_path / "marker"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_ensure_in_child, args=(out, files, marker, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert marker.read_text() == "prepared\n"
    mtime = (out / "meta.json").stat().st_mtime_ns
    assert builtin.ensure_builtin(out, VOCAB, files=files) == out
    assert (out / "meta.json").stat().st_mtime_ns == mtime
    meta = json.loads((out / "meta.json").read_text())
    assert meta["inputs"] == ["builtin"] and meta["n_documents"] >= 2
    with pytest.raises(UserError, match="vocab size"):
        builtin.ensure_builtin(out, VOCAB + 1, files=files)
    TokenData(out, block_size=32, seed=0).train_micro_batches(0, 0, 1, 2, 1)
