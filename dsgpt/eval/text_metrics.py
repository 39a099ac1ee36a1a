"""Scores of generated text against references: BLEU, ROUGE-1/2/L F1, exact match.

BLEU is sacrebleu's corpus BLEU (0-100, its default 13a tokenization), the figure papers report.
ROUGE is rouge-score's F1 averaged over examples, with stemming off: a memorised or copied answer
must match word for word, and stemming would blur "run"/"running". Exact match compares the texts
with surrounding whitespace stripped. Every score is computed on the stripped texts.
"""

from __future__ import annotations

from typing import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def rouge(hypotheses: Sequence[str], references: Sequence[str], stem: bool = False) -> dict[str, float]:
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stem)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hypotheses, references):
        for name, s in scorer.score(ref, hyp).items():  # score(target, prediction)
            totals[name] += s.fmeasure
    n = max(len(hypotheses), 1)
    return {name: total / n for name, total in totals.items()}


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    pairs = list(zip(hypotheses, references))
    return sum(h == r for h, r in pairs) / max(len(pairs), 1)


def score_texts(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Every metric of this module on one set of (hypothesis, reference) pairs."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    hyps = [h.strip() for h in hypotheses]
    refs = [r.strip() for r in references]
    return {"bleu": bleu(hyps, refs), **rouge(hyps, refs), "exact_match": exact_match(hyps, refs)}
