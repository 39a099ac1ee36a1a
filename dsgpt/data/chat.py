"""Conversations -> (token ids, label flags): reading chat JSONL, applying a chat template, fitting.

A chat template is Jinja (the format Hugging Face tokenizers carry as `chat_template`) that must
wrap what the model learns to write in `{% generation %}...{% endgeneration %}`, the marker
transformers' `return_assistant_tokens_mask` reads. Labels are therefore defined by the template
itself, for the default one and a user's alike: a token is labelled when its characters overlap a
generation block. The default template puts role markers that are special tokens (one id each)
around every message and labels the assistant's content plus its end-of-turn marker.

Input records (one JSON object per line):
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  {"prompt": "...", "response": "..."}        (one user turn and one assistant reply)
Malformed lines, unknown shapes and unknown roles are UserErrors naming file and line; an empty
conversation, one with no assistant turn and one where no labelled token fits are skipped and
counted under SKIP_REASONS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dsgpt.errors import UserError
from dsgpt.io import read_jsonl

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
ROLE_MARKERS = (SYSTEM, USER, ASSISTANT, END)
ROLES = ("system", "user", "assistant")
SKIP_REASONS = ("empty", "no_assistant", "no_label_fits")

DEFAULT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}<|assistant|>{% generation %}{{ m.content }}<|end|>{% endgeneration %}"
    "{% else %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Private-use characters bracket each generation block in the rendered text and are cut out
# afterwards, which gives the blocks' character spans without tracking Jinja's output stream.
_OPEN, _CLOSE = "\ue000", "\ue001"
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass
class Example:
    ids: list[int]
    labelled: list[bool]  # token i is a target (predicted from token i - 1)


class ChatTemplate:
    """A Jinja chat template; `render(messages)` gives the text and the assistant spans."""

    def __init__(self, source: str = DEFAULT_TEMPLATE, name: str = "the default chat template"):
        import jinja2
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not _GENERATION_TAG.search(source):
            raise UserError(
                f"{name} does not mark the assistant's content with {{% generation %}} ... "
                "{% endgeneration %}, so dsgpt cannot tell which tokens to train on. Wrap each assistant "
                "message (and its end-of-turn token) in that block, as transformers' "
                "return_assistant_tokens_mask expects, e.g. {% generation %}{{ m.content }}<|end|>{% endgeneration %}."
            )

        class Generation(Extension):
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_wrap"), [], [], body).set_lineno(lineno)

            def _wrap(self, caller):
                return _OPEN + caller() + _CLOSE

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[Generation, "jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateError as err:
            raise UserError(f"{name} is not a valid Jinja template: {err}.") from None
        self.source, self.name = source, name

    @classmethod
    def from_file(cls, path) -> ChatTemplate:
        path = Path(path).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise UserError(f"Cannot read the chat template {path}: {err.strerror}. Check --chat-template.") from None
        return cls(text, name=f"The chat template {path}")

    def render(self, messages: list[dict], **extra) -> tuple[str, list[tuple[int, int]]]:
        import jinja2

        try:
            marked = self._template.render(messages=messages, **extra)
        except jinja2.exceptions.TemplateError as err:
            raise UserError(f"{self.name} failed to render a conversation: {err}.") from None
        text, spans, pos, start = [], [], 0, None
        for piece in re.split(f"([{_OPEN}{_CLOSE}])", marked):
            if piece == _OPEN:
                start = pos
            elif piece == _CLOSE:
                spans.append((start, pos))
            else:
                text.append(piece)
                pos += len(piece)
        return "".join(text), spans


def read_conversations(path) -> Iterator[tuple[str, int, list[dict] | None]]:
    """(file, line number, messages) for each non-blank line of a chat JSONL file; messages is
    None for a record to skip as "empty". Raises UserError on a line dsgpt cannot read."""
    path = Path(path).expanduser()
    try:
        f = open(path, encoding="utf-8")
    except OSError as err:
        raise UserError(f"Cannot read chat input {path}: {err.strerror}. Check --input.") from None
    with f:
        def where(n):
            return f"{path}, line {n}"
        for number, record in read_jsonl(f, where, "Each line must be one JSON object; fix or remove that line."):
            yield str(path), number, _messages(record, where(number))


def _messages(record, where: str) -> list[dict] | None:
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
    elif isinstance(record, dict) and "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]}]
    else:
        raise UserError(f"{where} is neither {{\"messages\": [...]}} nor {{\"prompt\": ..., \"response\": ...}}: "
                        "convert the record to one of those two shapes.")
    if not isinstance(messages, list):
        raise UserError(f"{where}: \"messages\" must be a list of {{\"role\", \"content\"}} objects.")
    if not messages:
        return None
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {i} must be an object with a string \"content\" and a \"role\".")
        if m.get("role") not in ROLES:
            raise UserError(f"{where}: message {i} has role {m.get('role')!r}; dsgpt knows the roles "
                            f"{', '.join(ROLES)}. Rename the role (e.g. human -> user, gpt -> assistant).")
        if _OPEN in m["content"] or _CLOSE in m["content"]:
            raise UserError(f"{where}: message {i} contains the private-use character U+E000 or U+E001, which "
                            "dsgpt reserves for marking the template's generation blocks; remove it.")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def encode(tok, template: ChatTemplate, messages: list[dict]) -> Example:
    """Render and tokenize; a token is labelled when its characters overlap a generation block."""
    text, spans = template.render(messages)
    enc = tok.encode(text, add_special_tokens=False)
    labelled = [any(s < b and e > a for a, b in spans) for s, e in enc.offsets]
    return Example(list(enc.ids), labelled)


def fit(tok, template: ChatTemplate, messages: list[dict], max_tokens: int) -> tuple[Example | None, str | None]:
    """The example for `messages` in at most `max_tokens` tokens, or (None, skip reason).

    Messages after the last assistant reply teach nothing and are dropped. While too long, the
    oldest exchange (a non-system message and what follows up to the next user message) is
    dropped, system messages kept; if the last exchange alone is too long its head is kept."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return None, "no_assistant"
    messages = messages[: last + 1]
    while True:
        ex = encode(tok, template, messages)
        if len(ex.ids) <= max_tokens:
            break
        body = [i for i, m in enumerate(messages) if m["role"] != "system"]
        cut = next((i for i in body[1:] if messages[i]["role"] == "user"), None)
        if cut is None:  # one exchange left: keep its head
            ex = Example(ex.ids[:max_tokens], ex.labelled[:max_tokens])
            break
        messages = [m for i, m in enumerate(messages) if m["role"] == "system" or i >= cut]
    # Token 0 is never a target (nothing predicts it), so it cannot be the only label.
    if not any(ex.labelled[1:]):
        return None, "no_label_fits"
    return ex, None


def turn_ends(ex: Example) -> list[int]:
    """The last token of each labelled run of `ex`: what ends each reply."""
    n = len(ex.ids)
    return [ex.ids[i] for i in range(n) if ex.labelled[i] and (i + 1 == n or not ex.labelled[i + 1])]


def end_of_turn(ends) -> int | None:
    """The token that ends replies under a user's template: the one that ends at least 90% of
    them (a reply cut to fit ends elsewhere), or None when replies end in no one token."""
    total = sum(ends.values())
    if not total:
        return None
    token, count = ends.most_common(1)[0]
    return int(token) if count >= 0.9 * total else None


@dataclass
class ChatSpec:
    """How a chat data dir frames conversations: its template, and the token that ends a reply
    (None when the template has no single end-of-turn token; the end-of-text token then ends it)."""
    template: ChatTemplate
    end_of_turn_id: int | None


def read_spec(data_path, run_dir=None) -> ChatSpec:
    """The chat template and end-of-turn token of a chat data dir (dsgpt prepare --chat); a
    UserError when the dir holds pretraining documents, naming `run_dir` when a run led here."""
    from dsgpt.data.dataset import read_meta
    path = Path(data_path)
    try:
        meta = read_meta(path, "chat")
    except UserError as err:
        if run_dir is None:
            raise
        raise UserError(f"The run '{run_dir}' was not fine-tuned on chat data, so it knows no chat template "
                        f"to talk through: {err} Fine-tune it on conversations first (train.init_from with "
                        "data from `dsgpt prepare --chat`), or sample it with `dsgpt generate`.") from None
    file = path / meta.get("chat_template", "chat_template.jinja")
    try:
        source = file.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"Cannot read the chat template {file} ({err.strerror}): the data directory is "
                        "damaged. Prepare it again with `dsgpt prepare --chat ... --overwrite`.") from None
    eot = meta.get("end_of_turn_id")
    return ChatSpec(ChatTemplate(source, name=f"The chat template {file}"), None if eot is None else int(eot))
