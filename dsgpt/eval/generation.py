"""Generation tasks: continue each prompt of a JSONL file and score the continuations against
their references (see text_metrics).

A file holds one `{"prompt": ..., "reference": ...}` object per line (blank lines skipped). The
model continues `EOS + prompt`: a prompt starts a document, and every training document followed
an EOS. Decoding is greedy by default and stops at EOS or after max_new_tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dsgpt.errors import UserError
from dsgpt.eval.text_metrics import score_texts


@dataclass
class Example:
    prompt: str
    reference: str


def read_examples(path) -> list[Example]:
    """The examples of a JSONL file; a bad line is a UserError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The generation task file '{path}' does not exist. Pass gen:FILE.jsonl with a JSONL "
                        f"file of {{\"prompt\": ..., \"reference\": ...}} objects, one per line.")
    examples = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"line {n} of '{path}'"
            try:
                obj = json.loads(line)
            except ValueError as err:
                raise UserError(f"{where} is not valid JSON ({err}). Each line must be one object like "
                                f"{{\"prompt\": \"...\", \"reference\": \"...\"}}.") from None
            if not isinstance(obj, dict):
                raise UserError(f"{where} holds a {type(obj).__name__}, not an object with \"prompt\" and "
                                f"\"reference\".")
            for field in ("prompt", "reference"):
                if not isinstance(obj.get(field), str):
                    problem = "has no" if field not in obj else "has a non-string"
                    raise UserError(f"{where} {problem} \"{field}\" field; each line needs string fields "
                                    f"\"prompt\" and \"reference\".")
            examples.append(Example(obj["prompt"], obj["reference"]))
    if not examples:
        raise UserError(f"The generation task file '{path}' holds no examples.")
    return examples


def continuation(model, tok, eos_id: int, prompt: str, max_new_tokens: int, device) -> str:
    """The model's greedy continuation of `prompt` as text, without the prompt and the EOS.

    The one call into dsgpt.generate, so a faster batched API can replace it here alone."""
    from dsgpt.generate import sample
    ids = [eos_id] + tok.encode(prompt).ids
    block = model.config.block_size
    if len(ids) > block:
        raise UserError(f"A prompt is {len(ids)} tokens (with its leading EOS), longer than the model's "
                        f"context of {block}: {prompt[:60]!r}. Shorten it.")
    out = sample(model, torch.tensor([ids], device=device), max_new_tokens, block, temperature=0.0,
                 eos_id=eos_id, vocab_size=tok.get_vocab_size())[0, len(ids):].tolist()
    if eos_id in out:
        out = out[:out.index(eos_id)]
    return tok.decode(out)


def run_generation(model, tok, eos_id: int, examples: list[Example], max_new_tokens: int, device,
                   progress: bool = False) -> tuple[dict, list[dict]]:
    """(scores, per-example records) of the model on `examples`."""
    from tqdm import tqdm
    outputs = [continuation(model, tok, eos_id, ex.prompt, max_new_tokens, device)
               for ex in tqdm(examples, desc="generate", unit="example", disable=not progress, leave=False)]
    scores = score_texts(outputs, [ex.reference for ex in examples])
    scores["examples"] = len(examples)
    records = [{"prompt": ex.prompt, "reference": ex.reference, "output": out} for ex, out in zip(examples, outputs)]
    return scores, records
