"""A built-in instruction set with rules a small model can learn: `dsgpt prepare --chat --input builtin`.

Every conversation asks for one of four operations on a short list of everyday words:

    repeat: red fox hill      ->  red fox hill
    reverse: red fox hill     ->  hill fox red
    first: red fox hill       ->  red
    last: red fox hill        ->  hill

The answer follows from the prompt alone, so a model that learned the rule answers word lists it
never saw. The held-out set is made of word lists that no training or validation conversation
contains (under any operation): answering them is generalisation, not recall. A fraction of the
conversations carry a system prompt and some have two exchanges, so the template's system and
multi-turn paths are trained too. Everything follows from the seed: no download, same set everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = (
    "red blue green gold black white fox cat dog owl bee ant hill lake sea sky sun moon star rain "
    "snow wind tree leaf rose seed rock sand road door book pen cup hat box key bell ship boat car "
    "map coin ring lamp milk tea bread cake egg fish bird frog bear wolf lion duck king queen"
).split()
OPERATIONS = ("repeat", "reverse", "first", "last")
SYSTEM_PROMPT = "You follow instructions exactly."
HELD_OUT_SHARE = 0.1  # of all word lists: never in train or val


def answer(operation: str, words: list[str]) -> str:
    if operation == "repeat":
        return " ".join(words)
    if operation == "reverse":
        return " ".join(reversed(words))
    if operation == "first":
        return words[0]
    if operation == "last":
        return words[-1]
    raise ValueError(f"unknown operation {operation!r}")


def _word_list(rng: np.random.Generator) -> tuple[str, ...]:
    n = int(rng.integers(2, 5))  # 2 to 4 distinct words
    return tuple(WORDS[i] for i in rng.choice(len(WORDS), size=n, replace=False))


def _held_out(words: tuple[str, ...], seed: int) -> bool:
    # A fixed share of all word lists, decided by the list itself: the same list is held out
    # wherever it appears, whatever operation asks for it.
    key = np.random.default_rng([seed, *(WORDS.index(w) for w in words), len(words)])
    return key.random() < HELD_OUT_SHARE


def _turn(rng: np.random.Generator, seed: int, want_held_out: bool) -> tuple[str, str]:
    while True:
        words = _word_list(rng)
        if _held_out(words, seed) == want_held_out:
            op = OPERATIONS[int(rng.integers(len(OPERATIONS)))]
            return f"{op}: {' '.join(words)}", answer(op, list(words))


def conversations(n: int, seed: int = 0) -> list[dict]:
    """`n` training conversations ({"messages": [...]}) over word lists that are not held out."""
    rng = np.random.default_rng([seed, 1])
    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.3 else []
        for _ in range(2 if rng.random() < 0.2 else 1):
            prompt, reply = _turn(rng, seed, want_held_out=False)
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        out.append({"messages": messages})
    return out


def held_out(n: int, seed: int = 0) -> list[dict]:
    """`n` distinct {"prompt", "response"} pairs whose word lists no training conversation has."""
    rng = np.random.default_rng([seed, 2])
    out, seen = [], set()
    while len(out) < n:
        prompt, reply = _turn(rng, seed, want_held_out=True)
        if prompt not in seen:
            seen.add(prompt)
            out.append({"prompt": prompt, "response": reply})
    return out


def write(train_path, held_out_path, n_train: int = 20_000, n_held_out: int = 200, seed: int = 0) -> None:
    """The training conversations and the held-out pairs as JSONL files."""
    for path, records in ((train_path, conversations(n_train, seed)), (held_out_path, held_out(n_held_out, seed))):
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
