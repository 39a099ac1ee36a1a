"""Cleaning before pretraining: quality filters, PII scrubbing, exact and near dedup, document
splitting, the report (lengths, context fractions) and `dsgpt inspect`; and their bad inputs."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from dsgpt.cli import main
from dsgpt.data.clean import CleanSettings, clean_settings
from dsgpt.data.clean.dedup import NearDedup, normalize
from dsgpt.data.clean.filters import Doc, QualityFilter, duplicate_ngram_fraction, script_fraction, top_ngram_fraction
from dsgpt.data.clean.pii import Scrubber, luhn_ok
from dsgpt.data.prepare import prepare, prepare_documents
from dsgpt.data.sources import iter_documents
from dsgpt.data.tokenizer import EOS_TOKEN, load_tokenizer
from dsgpt.errors import UserError

VOCAB = 300
STOP = ("the", "be", "to", "of", "and", "that", "have", "with")
SYLLABLES = ("ka", "lo", "mi", "ren", "tas", "vo", "pel", "dun", "shi", "gar", "bel", "tor", "nim", "fa", "qui",
             "zen")
CYRILLIC = ("ка", "ло", "ми", "рен", "тас", "во", "пел", "дун", "ши", "гар", "бел", "тор", "ним", "фа")


def lexicon(seed: int = 0, n: int = 600, syllables=SYLLABLES) -> list[str]:
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))))
    return sorted(words)


WORDS = lexicon()


def prose(seed: int, n_words: int = 150, per_line: int = 12, words=WORDS, stop=STOP) -> str:
    """Text that passes every Gopher rule: stop words, 4-7 letter words, unique lines, no repeats."""
    rng = random.Random(seed)
    picked = [rng.choice(stop) if stop and rng.random() < 0.25 else rng.choice(words) for _ in range(n_words)]
    lines = [" ".join(picked[i : i + per_line]) + "." for i in range(0, n_words, per_line)]
    return "\n".join(line[0].upper() + line[1:] for line in lines)


def change_words(text: str, fraction: float, seed: int) -> str:
    """`text` with `fraction` of its words (at random places) replaced by other words."""
    rng = random.Random(seed)
    words = text.split(" ")
    for i in rng.sample(range(len(words)), round(len(words) * fraction)):
        words[i] = rng.choice([w for w in WORDS if w != words[i]])
    return " ".join(words)


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def documents_in(out: Path) -> list[str]:
    """Every document of a prepared dir (train then val), decoded."""
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(out)
    docs = []
    for split in ("train", "val"):
        ids = np.concatenate([np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in meta[f"{split}_shards"]])
        docs += tok.decode(ids.tolist(), skip_special_tokens=False).split(EOS_TOKEN)[:-1]
    return docs


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


GOPHER = clean_settings(gopher=True)


# ---- quality filters ---------------------------------------------------------------------------

def _lines(text: str) -> list[str]:
    return text.splitlines()


# rule -> a document made to fail that rule (and, in the Gopher order, no rule before it)
BAD = {
    "word_count": " ".join(prose(1).split()[:30]),
    "mean_word_length": " ".join(random.Random(2).choice(["a", "to", "of", "is", "an", "I", "it", "be", "we", "the"])
                                 for _ in range(120)),
    "symbol_ratio": prose(3) + "\n" + " ".join(f"#{w}" for w in WORDS[:25]),
    "alphabetic_words": prose(4) + "\n" + " ".join(str(100 + i) for i in range(60)),
    "stop_words": "\n".join(" ".join(WORDS[i : i + 12]) + "." for i in range(0, 150, 12)),
    "bullet_lines": "\n".join("• " + line for line in _lines(prose(5))),
    "ellipsis_lines": "\n".join(line + (" ..." if i % 2 else "") for i, line in enumerate(_lines(prose(6)))),
    "duplicate_lines": "\n".join(_lines(prose(7)) + _lines(prose(7))[:6]),
    "top_ngrams": prose(8) + " " + " ".join(f"kalo mipel {w}" for w in WORDS[40:80]),
    "duplicate_ngrams": prose(9, per_line=1000) + " " + " ".join(prose(9).split()[20:45]),
}


def test_a_clean_document_passes_every_gopher_rule():
    qf = QualityFilter(GOPHER.filters)
    for seed in range(20):
        assert qf.first_failure(prose(seed)) is None, seed
    assert list(GOPHER.filters) == ["word_count", "mean_word_length", "symbol_ratio", "alphabetic_words", "stop_words",
                                    "bullet_lines", "ellipsis_lines", "duplicate_lines", "duplicate_paragraphs",
                                    "top_ngrams", "duplicate_ngrams"]


@pytest.mark.parametrize("rule", sorted(BAD))
def test_each_rule_drops_its_document_and_keeps_a_clean_one(rule):
    # Under all the Gopher rules, the crafted document fails this rule first ...
    assert QualityFilter(GOPHER.filters).first_failure(BAD[rule]) == rule
    # ... and on its own, the rule keeps clean documents and drops the crafted one.
    alone = QualityFilter(clean_settings({"filters": {rule: True}}).filters)
    assert alone.first_failure(prose(11)) is None
    assert alone.first_failure(BAD[rule]) == rule


def test_rule_thresholds_are_the_gopher_values_and_can_be_changed():
    f = GOPHER.filters
    assert (f["word_count"].min, f["word_count"].max) == (50, 100_000)
    assert (f["mean_word_length"].min, f["mean_word_length"].max) == (3, 10)
    assert f["symbol_ratio"].max == 0.1 and f["alphabetic_words"].min == 0.8 and f["stop_words"].min == 2
    assert f["bullet_lines"].max == 0.9 and f["ellipsis_lines"].max == 0.3
    assert (f["duplicate_lines"].max_fraction, f["duplicate_lines"].max_char_fraction) == (0.3, 0.2)
    assert (f["duplicate_paragraphs"].max_fraction, f["duplicate_paragraphs"].max_char_fraction) == (0.3, 0.2)
    assert f["top_ngrams"].max_char_fraction == {2: 0.2, 3: 0.18, 4: 0.16}
    assert f["duplicate_ngrams"].max_char_fraction == {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.1}
    # Too long for a lowered maximum; too short words only under a raised minimum.
    assert QualityFilter(clean_settings({"filters": {"word_count": {"max": 100}}}).filters).first_failure(prose(1)) \
        == "word_count"
    raised = clean_settings({"filters": {"mean_word_length": {"min": 6}}}).filters
    assert QualityFilter(raised).first_failure(prose(1)) == "mean_word_length"
    looser = clean_settings({"filters": {"gopher": True, "ellipsis_lines": {"max": 0.6}}})
    assert QualityFilter(looser.filters).first_failure(BAD["ellipsis_lines"]) is None


def test_duplicate_paragraphs_counts_repeated_paragraphs():
    paras = ["\n".join(_lines(prose(s, n_words=36))) for s in range(6)]
    doc = "\n\n".join(paras + paras[:3])  # 3 of 9 paragraphs repeat: over 0.2 of the characters
    rule = QualityFilter(clean_settings({"filters": {"duplicate_paragraphs": True}}).filters)
    assert rule.first_failure(doc) == "duplicate_paragraphs"
    assert rule.first_failure("\n\n".join(paras)) is None
    assert Doc("a\n\n\n b \nc\n\nd").paragraphs == ["a", "b\nc", "d"]


def test_repetition_measures_on_small_cases():
    # "a b c a b c": the 3-gram "a b c" occurs twice and covers every word; the top 2-gram
    # ("a b" or "b c", twice, 2 chars each) covers 4 of 6 characters.
    doc = Doc("a b c a b c")
    assert duplicate_ngram_fraction(doc, 3) == 1.0
    assert top_ngram_fraction(doc, 2) == pytest.approx(4 / 6)
    assert duplicate_ngram_fraction(doc, 4) == 0.0 and top_ngram_fraction(Doc("a b c d"), 2) == 0.0
    # Overlapping repeats count each word once: "x y x y x" has "x y" 2x, "y x" 2x: all covered.
    assert duplicate_ngram_fraction(Doc("x y x y x"), 2) == 1.0
    # A longer n after a shorter one and back: the cached hashes start over correctly.
    long_doc = Doc("p q r s p q r s t")
    assert duplicate_ngram_fraction(long_doc, 4) == pytest.approx(8 / 9)
    assert duplicate_ngram_fraction(long_doc, 2) == pytest.approx(8 / 9)
    assert duplicate_ngram_fraction(long_doc, 5) == 0.0


def test_rules_agree_with_their_plain_definitions():
    """The fast paths (a regex for letterless words, stopping the n-gram checks early) decide as
    the definitions in dsgpt.data.clean.filters read."""
    from dsgpt.data.clean import filters

    rng = random.Random(7)
    docs = [prose(s) for s in range(5)] + list(BAD.values())
    docs += [" ".join(rng.choice(["naïve", "日本", "½", "_", "---", "42", "x1", "§§", "Ωmega", "a.b"])
                      for _ in range(80)) for _ in range(5)]
    docs += [prose(s, n_words=60) + " " + " ".join(prose(s, n_words=60).split()[: rng.randint(3, 40)])
             for s in range(20)]
    dup = clean_settings({"filters": {"duplicate_ngrams": True}}).filters["duplicate_ngrams"]
    for text in docs:
        doc = Doc(text)
        with_letters = sum(1 for w in doc.words if any(c.isalpha() for c in w)) / len(doc.words)
        for limit in (0.5, 0.8, 0.9):
            assert filters.alphabetic_words(doc, type("P", (), {"min": limit})) == (with_letters >= limit)
        fracs = [duplicate_ngram_fraction(doc, n) for n in range(5, 11)]
        assert fracs == sorted(fracs, reverse=True)  # longer n-grams never cover more
        assert filters.duplicate_ngrams(doc, dup) == all(
            duplicate_ngram_fraction(doc, n) <= lim for n, lim in dup.max_char_fraction.items())


def test_script_check_counts_letters_of_the_named_scripts():
    latin, cyrillic = prose(1), prose(2, words=lexicon(3, syllables=CYRILLIC), stop=("и", "в", "не", "на"))
    assert script_fraction(latin, ["Latin"]) == 1.0 and script_fraction(cyrillic, ["Latin"]) == 0.0
    mixed = latin + "\n" + cyrillic
    assert 0.3 < script_fraction(mixed, ["Latin"]) < 0.7
    assert script_fraction("123 %%% !!!", ["Latin"]) == 0.0  # no letters: nothing in the script
    assert script_fraction("日本語のテキスト", ["Han", "Hiragana", "Katakana"]) == 1.0
    rule = QualityFilter(clean_settings(script="Latin").filters)
    assert rule.first_failure(latin) is None
    assert rule.first_failure(cyrillic) == rule.first_failure(mixed) == "script"
    lenient = QualityFilter(clean_settings({"filters": {"script": {"name": "Latin", "min": 0.3}}}).filters)
    assert lenient.first_failure(mixed) is None


def test_filter_counts_in_the_report(tmp_path):
    good = [prose(100 + i) for i in range(12)]
    docs = good[:6] + [BAD[r] for r in sorted(BAD)] + good[6:] + [prose(3, words=lexicon(3, syllables=CYRILLIC))]
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    prepare([str(src)], tmp_path / "out", vocab_size=VOCAB, progress=False,
            clean=clean_settings(gopher=True, script="Latin"))
    c = report_of(tmp_path / "out")["cleaning"]
    dropped = c["quality_filters"]["dropped"]
    # The Cyrillic document (with English stop words) fails the script check.
    assert dropped == {**{r: 1 for r in BAD}, "script": 1, "duplicate_paragraphs": 0}
    assert (c["documents_read"], c["documents_kept"], c["documents_dropped"]) == (len(docs), 12, len(docs) - 12)
    assert sorted(documents_in(tmp_path / "out")) == sorted(good)


# ---- PII -------------------------------------------------------------------------------------

PII_POSITIVE = [
    ("mail john.doe+news@example.co.uk today", "email", "mail <EMAIL> today"),
    ("(a.b@mit.edu)", "email", "(<EMAIL>)"),
    ("card 4111 1111 1111 1111 exp", "card", "card <CARD> exp"),
    ("card 4111-1111-1111-1111.", "card", "card <CARD>."),
    ("pay 5555555555554444 now", "card", "pay <CARD> now"),
    ("amex 3782 822463 10005", "card", "amex <CARD>"),
    ("host 192.168.0.1, done", "ipv4", "host <IP_ADDRESS>, done"),
    ("at 255.255.255.255.", "ipv4", "at <IP_ADDRESS>."),
    ("v6 2001:db8::8a2e:370:7334 up", "ipv6", "v6 <IP_ADDRESS> up"),
    ("link fe80::1 and ::ffff:192.168.0.1", "ipv6", "link <IP_ADDRESS> and <IP_ADDRESS>"),
    ("call +44 20 7946 0958 now", "phone", "call <PHONE> now"),
    ("call +1 (415) 555-0132", "phone", "call <PHONE>"),
    ("office (415) 555-0132", "phone", "office <PHONE>"),
    ("fax 415-555-0132 or 415.555.0132", "phone", "fax <PHONE> or <PHONE>"),
    ("toll free 1-800-555-0199", "phone", "toll free <PHONE>"),
    ("Berlin +49-30-1234567", "phone", "Berlin <PHONE>"),
]
PII_NEGATIVE = [
    "released v1.2.3.4 today", "10.0.0.300 is not an address", "version 1.2.3.4.5", "python 3.11.2",
    "on 2024-01-15 we met", "dated 2024/01/15 and 15.01.2024 at 12:30:45", "pi is 3.14159 and e 2.71828",
    "1,000,000 and 123-456-7890 and 555 123 4567", "x = 2 + 3 - 4", "isbn 978-0-306-40615-7",
    "4111 1111 1111 1112", "4111111111111112", "1705312345678 ms since epoch", "0000 0000 0000 0000",
    "a[1::2] and std::vector and ::1", "mac 00:1a:2b:3c:4d:5e", "@property and user@localhost", "score +5 -3",
]


@pytest.mark.parametrize("text,kind,expected", PII_POSITIVE)
def test_pii_is_replaced_and_counted(text, kind, expected):
    scrub = Scrubber()
    assert scrub(text) == expected
    assert scrub.found[kind] == expected.count("<") and sum(scrub.found.values()) == scrub.found[kind]
    assert scrub.documents_changed == 1


@pytest.mark.parametrize("text", PII_NEGATIVE)
def test_lookalikes_are_left_alone(text):
    scrub = Scrubber()
    assert scrub(text) == text and sum(scrub.found.values()) == 0 and scrub.documents_changed == 0


def test_luhn_and_only_the_chosen_kinds():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713") and not luhn_ok("4111111111111112")
    only_mail = Scrubber(["email"])
    assert only_mail("a@b.com 192.168.0.1") == "<EMAIL> 192.168.0.1" and set(only_mail.found) == {"email"}


def test_pii_counts_in_the_report(tmp_path):
    base = [prose(200 + i) for i in range(4)]
    docs = [base[0] + "\nWrite to ann@example.org or bob@example.org.",
            base[1] + "\nServer 10.1.2.3 and 2001:db8::1:2:3, phone +44 20 7946 0958.",
            base[2] + "\nCard 4111 1111 1111 1111 and not 4111 1111 1111 1112.",
            base[3]]
    src = write_jsonl(tmp_path / "pii.jsonl", docs)
    prepare([str(src)], tmp_path / "out", vocab_size=VOCAB, progress=False, clean=clean_settings(pii=True))
    pii = report_of(tmp_path / "out")["cleaning"]["pii"]
    assert pii == {"replaced": {"email": 2, "card": 1, "ipv6": 1, "ipv4": 1, "phone": 1}, "documents_changed": 3}
    text = "\n".join(documents_in(tmp_path / "out"))
    assert "ann@" not in text and "10.1.2.3" not in text and "4111 1111 1111 1112" in text
    assert text.count("<EMAIL>") == 2 and "<CARD>" in text and "<PHONE>" in text


# ---- dedup -----------------------------------------------------------------------------------

def test_exact_duplicates_ignore_case_width_and_whitespace():
    assert normalize("  Hello\u3000WORLD\n\n  ＡＢＣ  ") == normalize("hello world abc") == "hello world abc"
    assert normalize("Straße") == normalize("STRASSE")


def test_exact_and_near_duplicates_across_files(tmp_path):
    a, b, c = prose(300, n_words=300), prose(301, n_words=300), prose(302, n_words=300)
    near = change_words(a, 0.05, seed=1)  # 5% of the words changed: a near duplicate of a
    far = change_words(b, 0.30, seed=2)  # 30% changed: below the threshold, kept
    variant = "  " + c.upper().replace("\n", "\n\n   ") + "\t"  # case and whitespace only: exact
    others = [prose(310 + i, n_words=120) for i in range(5)]
    (tmp_path / "first").mkdir()
    (tmp_path / "first" / "a.txt").write_text(a)
    (tmp_path / "first" / "b.txt").write_text(b)
    write_jsonl(tmp_path / "first" / "c.jsonl", [c, *others])
    second = write_jsonl(tmp_path / "second.jsonl", [near, far, variant, c, others[2]])
    clean = clean_settings(dedup=True)
    assert clean.exact_dedup and clean.near_dedup.threshold == 0.6 and clean.near_dedup.shingle_words == 3
    prepare([str(tmp_path / "first"), str(second)], tmp_path / "out", vocab_size=VOCAB, progress=False, clean=clean)
    report = report_of(tmp_path / "out")
    assert report["cleaning"]["exact_dedup"]["removed"] == 3  # the variant, c again, others[2] again
    assert report["cleaning"]["near_dedup"]["removed"] == 1  # near
    kept = documents_in(tmp_path / "out")
    assert sorted(kept) == sorted([a, b, c, *others, far])  # first occurrences, and the far pair
    # The estimates behind those decisions, against the threshold:
    nd = NearDedup()
    sim = lambda x, y: nd.similarity(nd.signature(normalize(x)), nd.signature(normalize(y)))  # noqa: E731
    assert sim(a, near) >= 0.6 > 0.35 > sim(b, far)
    # A lower threshold keeps fewer: the far pair goes too.
    prepare([str(tmp_path / "first"), str(second)], tmp_path / "low", vocab_size=VOCAB, progress=False,
            clean=clean_settings(dedup=True, near_threshold=0.1))
    assert report_of(tmp_path / "low")["cleaning"]["near_dedup"]["removed"] == 2


def test_near_dedup_keeps_signatures_not_documents():
    """The state per kept document does not depend on the documents' length."""
    short, long = NearDedup(), NearDedup()
    for i in range(60):
        assert not short.is_duplicate(normalize(prose(400 + i, n_words=60)))
        assert not long.is_duplicate(normalize(prose(400 + i, n_words=3000)))
    assert short.n_kept == long.n_kept == 60
    assert short.state_bytes() == long.state_bytes() < 60 * 4096
    assert (short.bands, short.rows) == (25, 5)
    # Jaccard estimates follow the true similarity of the shingle sets.
    x, y = prose(1, n_words=400), change_words(prose(1, n_words=400), 0.1, seed=3)
    shingles = lambda t: {tuple(normalize(t).split()[i : i + 3]) for i in range(len(t.split()) - 2)}  # noqa: E731
    true = len(shingles(x) & shingles(y)) / len(shingles(x) | shingles(y))
    assert abs(short.similarity(short.signature(normalize(x)), short.signature(normalize(y))) - true) < 0.1


def test_stage_order_filters_then_pii_then_dedup(tmp_path):
    base = prose(500)
    docs = [base + "\nMail ann@example.org", base + "\nMail bob@example.org",  # equal once scrubbed
            BAD["word_count"] + " eve@example.org",  # dropped by a filter before PII is counted
            prose(501), prose(502)]
    src = write_jsonl(tmp_path / "order.jsonl", docs)
    prepare([str(src)], tmp_path / "out", vocab_size=VOCAB, progress=False,
            clean=clean_settings(gopher=True, pii=True, dedup=True))
    c = report_of(tmp_path / "out")["cleaning"]
    assert c["stages"] == ["quality_filters", "pii", "exact_dedup", "near_dedup"]
    assert c["quality_filters"]["dropped"]["word_count"] == 1
    assert c["pii"]["replaced"]["email"] == 2 and c["exact_dedup"]["removed"] == 1
    assert c["near_dedup"]["removed"] == 0 and c["documents_kept"] == 3


def test_bpe_is_trained_on_the_cleaned_stream(tmp_path):
    """Cleaning inside prepare gives the same tokenizer and shards as preparing the already
    cleaned documents: the BPE never saw what cleaning removed."""
    docs = [prose(600 + i) for i in range(8)]
    raw = docs + [d.upper() for d in docs[:4]] + [BAD["bullet_lines"], prose(620) + " call 415-555-0132",
                                                  change_words(docs[2], 0.05, seed=4)]
    settings = clean_settings(gopher=True, pii=True, dedup=True)
    prepare_documents(lambda: iter(raw), tmp_path / "cleaned", vocab_size=VOCAB, progress=False, clean=settings)
    cleaned = docs + [prose(620) + " call <PHONE>"]
    prepare_documents(lambda: iter(cleaned), tmp_path / "plain", vocab_size=VOCAB, progress=False)
    for name in ("tokenizer.json", "train_00000.bin", "val_00000.bin"):
        assert (tmp_path / "cleaned" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name


# ---- stages off, determinism, progress, interruption -----------------------------------------

def test_flags_add_to_the_config_file():
    config = {"filters": {"script": {"min": 0.5, "name": "Greek"}, "stop_words": False}, "pii": ["email"],
              "dedup": {"near": {"threshold": 0.9, "shingle_words": 5}}}
    s = clean_settings(config, gopher=True, script="Latin", pii=True, dedup=True)
    assert "stop_words" not in s.filters and s.filters["script"].name == ("Latin",) and s.filters["script"].min == 0.5
    assert s.pii == ("email", "phone", "ipv4", "ipv6", "card") and s.exact_dedup
    assert (s.near_dedup.threshold, s.near_dedup.shingle_words) == (0.9, 5)
    assert clean_settings(config, dedup=True, near_threshold=0.7).near_dedup.threshold == 0.7
    alone = clean_settings(config)
    assert list(alone.filters) == ["script"] and alone.pii == ("email",) and not alone.exact_dedup


def test_cleaning_is_off_by_default_and_each_stage_switches_alone(tmp_path):
    docs = [prose(700 + i) for i in range(6)] + [BAD["word_count"]]
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    default = prepare([str(src)], tmp_path / "default", vocab_size=VOCAB, progress=False)
    off = prepare([str(src)], tmp_path / "off", vocab_size=VOCAB, progress=False, clean=CleanSettings())
    assert default["data_sha256"] == off["data_sha256"] and default["cleaning"] is None
    assert report_of(tmp_path / "default")["cleaning"] == {
        "documents_read": 7, "documents_kept": 7, "documents_dropped": 0, "stages": []}
    for kwargs, stages in ((dict(gopher=True), ["quality_filters"]), (dict(pii=True), ["pii"]),
                           ({"config": {"dedup": {"exact": True}}}, ["exact_dedup"]),
                           ({"config": {"dedup": {"near": True}}}, ["near_dedup"])):
        assert clean_settings(**kwargs).stages() == stages


def test_prepare_with_cleaning_is_deterministic(tmp_path):
    docs = [prose(800 + i) for i in range(10)] + [change_words(prose(800), 0.05, 9)]
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    settings = clean_settings(gopher=True, pii=True, dedup=True)
    for out in ("one", "two"):
        prepare([str(src)], tmp_path / out, vocab_size=VOCAB, progress=False, clean=settings)
    for path in (tmp_path / "one").iterdir():
        assert (tmp_path / "two" / path.name).read_bytes() == path.read_bytes(), path.name


def test_progress_line_reports_documents_per_second(tmp_path, capsys, monkeypatch):
    from dsgpt.data import prepare as prep_mod

    monkeypatch.setattr(prep_mod, "_PROGRESS_EVERY_S", 0.0)
    src = write_jsonl(tmp_path / "d.jsonl", [prose(900 + i) for i in range(4)])
    prepare([str(src)], tmp_path / "out", vocab_size=VOCAB, progress=True, clean=clean_settings(dedup=True))
    err = capsys.readouterr().err
    assert "docs/s" in err and "tok/s" in err and "read" in err


def test_interrupted_cleaning_leaves_no_output(tmp_path):
    def docs():
        for i in range(5):
            yield prose(950 + i)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_documents(docs, tmp_path / "out", vocab_size=VOCAB, progress=False, clean=clean_settings(dedup=True))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ---- documents in text files -----------------------------------------------------------------

def test_doc_separator_splits_text_files(tmp_path):
    (tmp_path / "t.txt").write_text("%\nfirst doc\nline two\n%\n\n  \n%\nsecond\n\n%\nthird %\n%  \n")
    (tmp_path / "r.jsonl").write_text(json.dumps({"text": "row\n%\nstays whole"}) + "\n")
    files = [str(tmp_path / "t.txt"), str(tmp_path / "r.jsonl")]
    docs = list(iter_documents(files, doc_separator="%"))
    assert docs == ["first doc\nline two", "second\n", "third %\n%  ", "row\n%\nstays whole"]
    assert list(iter_documents(files, doc_separator="%")) == docs  # deterministic
    assert list(iter_documents(files, doc_separator=r"%\s*"))[2:] == ["third %", "row\n%\nstays whole"]
    by_empty_line = list(iter_documents([str(tmp_path / "t.txt")], doc_separator=""))
    assert by_empty_line[:2] == ["%\nfirst doc\nline two\n%", "  \n%\nsecond"]
    assert len(list(iter_documents(files))) == 2  # no separator: a text file is one document
    # CRLF files read the same; through the CLI, documents are counted and split by document.
    (tmp_path / "crlf.txt").write_bytes(b"a b\r\n---\r\nc d\r\n")
    assert list(iter_documents([str(tmp_path / "crlf.txt")], doc_separator="-{3,}")) == ["a b", "c d"]
    assert main(["prepare", "--input", str(tmp_path / "t.txt"), "--out", str(tmp_path / "out"), "--vocab-size",
                 str(VOCAB), "--doc-separator", "%", "--quiet"]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["n_documents"] == 3 and meta["doc_separator"] == "%"
    assert sorted(documents_in(tmp_path / "out")) == sorted(docs[:3])


# ---- length statistics -----------------------------------------------------------------------

def test_lengths_and_context_fractions_equal_an_independent_count(tmp_path):
    rng = random.Random(5)
    docs = [prose(1000 + i, n_words=rng.choice([3, 10, 40, 90, 200])) for i in range(40)]
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    blocks = (8, 32, 100, 500)
    prepare([str(src)], tmp_path / "out", vocab_size=VOCAB, progress=False, block_sizes=blocks)
    stats = report_of(tmp_path / "out")["lengths"]
    tok = load_tokenizer(tmp_path / "out")
    lengths = sorted(len(tok.encode(d, add_special_tokens=False).ids) for d in docs)
    # The shards agree: each document's tokens then one EOS.
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["n_train_tokens"] + meta["n_val_tokens"] == sum(lengths) + len(docs)
    assert stats["documents"] == len(docs) and stats["tokens"] == sum(lengths)
    assert (stats["min"], stats["max"]) == (lengths[0], lengths[-1])
    assert stats["mean"] == pytest.approx(sum(lengths) / len(lengths), abs=1e-3)
    for q, value in stats["percentiles"].items():
        assert value == lengths[math.ceil(int(q) / 100 * len(lengths)) - 1], q
    for b in blocks:  # tokens whose position in their document is >= b
        beyond = sum(1 for n in lengths for position in range(n) if position >= b)
        assert stats["context_beyond_block"][str(b)] == pytest.approx(beyond / sum(lengths)), b
    edges = stats["histogram"]["edges"]
    assert stats["histogram"]["counts"] == np.histogram(lengths, bins=edges)[0].tolist()
    png = tmp_path / "out" / "lengths.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_matplotlib_has_no_png(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed: import fails
    src = write_jsonl(tmp_path / "d.jsonl", [prose(1), prose(2)])
    prepare([str(src)], tmp_path / "out", vocab_size=VOCAB, progress=False)
    report = report_of(tmp_path / "out")
    assert report["histogram_png"] is None and report["lengths"]["documents"] == 2
    assert not (tmp_path / "out" / "lengths.png").exists()


# ---- inspect ---------------------------------------------------------------------------------

def test_inspect_prints_the_report_and_random_documents(tmp_path, capsys):
    docs = [prose(1100 + i, n_words=40) for i in range(12)] + ["Mail ann@example.org " + prose(1200)]
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    out = tmp_path / "out"
    assert main(["prepare", "--input", str(src), "--out", str(out), "--vocab-size", str(VOCAB), "--quiet",
                 "--scrub-pii", "--dedup", "--block-sizes", "16,64"]) == 0
    printed = capsys.readouterr().out
    assert "PII replaced: email 1" in printed and "near duplicates removed: 0" in printed and "64:" in printed
    assert main(["inspect", str(out), "--n", "3", "--seed", "4"]) == 0
    first = capsys.readouterr().out
    assert main(["inspect", str(out), "--n", "3", "--seed", "4"]) == 0
    assert capsys.readouterr().out == first  # seeded
    assert "PII replaced: email 1" in first and "document length in tokens" in first
    shown = [block.split("\n", 1)[1].rstrip("\n") for block in first.split("--- train document ")[1:]]
    assert len(shown) == 3
    cleaned = {d.replace("ann@example.org", "<EMAIL>") for d in docs}
    assert all(s.endswith(EOS_TOKEN) and s[: -len(EOS_TOKEN)] in cleaned for s in shown)
    assert main(["inspect", str(out), "--n", "1", "--split", "val", "--max-chars", "10"]) == 0
    assert "more characters]" in capsys.readouterr().out
    (out / "report.json").unlink()
    assert main(["inspect", str(out), "--n", "0"]) == 0
    assert "no report.json" in capsys.readouterr().out


# ---- bad inputs ------------------------------------------------------------------------------

@pytest.mark.parametrize("config,expected", [
    ({"filters": {"word_cont": {}}}, ["unknown filter 'word_cont'", "did you mean 'word_count'", "duplicate_ngrams"]),
    ({"filters": {"word_count": {"min": -1}}}, ["filters.word_count.min", "greater than or equal to 0", "-1"]),
    ({"filters": {"word_count": {"min": 500, "max": 100}}}, ["min (500) must not be above max (100)"]),
    ({"filters": {"alphabetic_words": {"min": 1.5}}}, ["filters.alphabetic_words.min", "less than or equal to 1"]),
    ({"filters": {"top_ngrams": {2: 1.5}}}, ["filters.top_ngrams", "1.5", "between 0 and 1"]),
    ({"filters": {"duplicate_ngrams": {0: 0.1}}}, ["n-gram size 0"]),
    ({"filters": {"stop_words": {"wrds": ["a"]}}}, ["filters.stop_words.wrds", "unknown setting", "'words'"]),
    ({"filters": {"script": {}}}, ["filters.script.name", "required"]),
    ({"filters": {"script": {"name": "Klingon"}}}, ["'Klingon' is not a Unicode script", "Latin"]),
    ({"filters": {"gopher": "yes"}}, ["filters.gopher", "true or false"]),
    ({"filters": ["word_count"]}, ["'filters' must be a mapping"]),
    ({"pii": ["emails"]}, ["unknown PII kind 'emails'", "did you mean 'email'"]),
    ({"dedup": {"near": {"threshold": 1.5}}}, ["dedup.near.threshold", "less than or equal to 1"]),
    ({"dedup": {"near": {"threshold": 0}}}, ["dedup.near.threshold", "greater than 0"]),
    ({"dedup": {"fuzzy": True}}, ["unknown key 'dedup.fuzzy'"]),
    ({"filtres": {}}, ["unknown key 'filtres'", "did you mean 'filters'"]),
])
def test_bad_cleaning_settings_are_one_clear_error(config, expected):
    with pytest.raises(UserError) as err:
        clean_settings(config)
    msg = str(err.value)
    assert "\n" not in msg and all(e in msg for e in expected), msg


def test_bad_cleaning_inputs_through_the_cli(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", [prose(1), prose(2)])
    short = write_jsonl(tmp_path / "short.jsonl", ["too short", "to keep"])
    out = tmp_path / "out"
    base = ["prepare", "--input", str(src), "--out", str(out), "--vocab-size", str(VOCAB), "--quiet"]
    (tmp_path / "cfg.yaml").write_text("filters:\n  gopher: true\n  mean_word_lenght: {min: 2}\n")
    (tmp_path / "broken.yaml").write_text("filters: [\n")
    (tmp_path / "list.yaml").write_text("- word_count\n")
    cases = [
        (["--clean-config", str(tmp_path / "cfg.yaml")], ["cfg.yaml", "unknown filter 'mean_word_lenght'",
                                                          "did you mean 'mean_word_length'"]),
        (["--clean-config", str(tmp_path / "broken.yaml")], ["broken.yaml", "not valid YAML"]),
        (["--clean-config", str(tmp_path / "list.yaml")], ["must be a mapping"]),
        (["--clean-config", str(tmp_path / "missing.yaml")], ["missing.yaml", "does not exist"]),
        (["--near-threshold", "0.5"], ["--near-threshold", "--dedup"]),
        (["--dedup", "--near-threshold", "2"], ["dedup.near.threshold", "less than or equal to 1"]),
        (["--script", "Latin,Elvish"], ["'Elvish' is not a Unicode script"]),
        (["--doc-separator", "(unclosed"], ["--doc-separator", "not a valid regular expression"]),
        (["--block-sizes", "128,abc"], ["--block-sizes", "comma-separated integers"]),
        (["--block-sizes", "0,128"], ["--block-sizes", "positive integers"]),
        (["--chat", "--block-size", "64", "--dedup"], ["--dedup is for pretraining documents", "--chat"]),
        (["--input", str(short), "--clean"], ["Cleaning dropped every one of the 2 documents", "word_count 2"]),
    ]
    for extra, expected in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert all(e in err for e in expected), (extra, err)
        assert not out.exists() and leftovers(tmp_path) == [], extra
    (tmp_path / "ok.yaml").write_text(
        "filters:\n  word_count: {min: 10}\npii: [email]\ndedup:\n  near: {threshold: 0.9}\n")
    assert main(base + ["--clean-config", str(tmp_path / "ok.yaml"), "--dedup"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["cleaning"] == {"filters": {"word_count": {"min": 10, "max": 100000}}, "pii": ["email"],
                                "dedup": {"exact": True, "near": {"threshold": 0.9, "num_perm": 128,
                                                                  "shingle_words": 3, "seed": 1}}}
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- the benchmark ---------------------------------------------------------------------------

def test_prepare_throughput_bench_runs_every_stage(capsys):
    """A smoke run of bench/prepare_throughput.py on a tiny corpus (speed is for the benchmark)."""
    from bench import prepare_throughput

    assert prepare_throughput.main(["--mb", "0.3", "--vocab", "300", "--repeats", "1", "--no-10x",
                                    "--no-record"]) == 0
    out = capsys.readouterr().out
    for name in prepare_throughput.CONFIGS:
        assert f"1x    {name}" in out, name
    assert "exact" in out and "near" in out
