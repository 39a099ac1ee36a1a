"""Generation tasks: continue each prompt of a JSONL file and score the continuations against
their references (see text_metrics).

A file holds one `{"prompt": ..., "reference": ...}` object per line (blank lines skipped). The
model continues `EOS + prompt`: a prompt starts a document, and every training document followed
an EOS. Decoding is greedy by default and stops at EOS or after max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dsgpt.errors import UserError
from dsgpt.eval.text_metrics import score_texts
from dsgpt.io import read_jsonl


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
    def line(n):
        return f"line {n} of '{path}'"
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, obj in read_jsonl(f, line, "Each line must be one object like "
                                 "{\"prompt\": \"...\", \"reference\": \"...\"}."):
            where = line(n)
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


def continuations(lm, tok, eos_id: int, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
                  progress: bool = False) -> list[str]:
    """The greedy continuation of each prompt as text, without the prompt and the EOS, in batches
    of unequal prompts (each gives what it gives alone)."""
    from tqdm import tqdm

    from dsgpt.generate import generate
    block = lm.config.block_size
    ids = [[eos_id] + tok.encode(p).ids for p in prompts]
    for row, prompt in zip(ids, prompts):
        if len(row) > block:
            raise UserError(f"A prompt is {len(row)} tokens (with its leading EOS), longer than the model's "
                            f"context of {block}: {prompt[:60]!r}. Shorten it.")
    texts = []
    for begin in tqdm(range(0, len(ids), batch_size), desc="generate", unit="batch", disable=not progress, leave=False):
        for new in generate(lm.forward, ids[begin:begin + batch_size], max_new_tokens, eos_id=eos_id,
                            vocab_size=tok.get_vocab_size(), device=lm.device):
            texts.append(tok.decode(new[:-1] if new and new[-1] == eos_id else new))
    return texts


def run_generation(lm, tok, eos_id: int, examples: list[Example], max_new_tokens: int,
                   progress: bool = False) -> tuple[dict, list[dict]]:
    """(scores, per-example records) of a LoadedModel on `examples`; on several ranks each
    continues its share of the prompts (all of them in ZeRO-3 lockstep)."""
    mine = lm.share([ex.prompt for ex in examples])
    outputs = lm.gather(continuations(lm, tok, eos_id, mine, max_new_tokens, progress=progress), len(examples))
    scores = score_texts(outputs, [ex.reference for ex in examples])
    scores["examples"] = len(examples)
    records = [{"prompt": ex.prompt, "reference": ex.reference, "output": out} for ex, out in zip(examples, outputs)]
    return scores, records
