"""`dsgpt chat`: a multi-turn conversation with a run fine-tuned on chat data.

The conversation goes through the chat template the run was trained with (its data dir's), with
the generation prompt (`<|assistant|>` for the default template) appended, and the reply is
generated with the KV cache until the end-of-turn token. The history is kept within the model's
context: the prompt plus room for the reply (`max_new_tokens`, at most half the context) must fit
in `block_size`, so the oldest exchanges are dropped first; the system prompt is always kept.

On a terminal it is interactive (replies stream as they are generated; `/reset` clears the
history, `/exit` or Ctrl-D quits). With stdin from a pipe or a file, every line is a user turn
(or a command) and every reply is written to stdout as one line, for scripts: a newline inside a
reply is written as the two characters `\n` and a backslash as `\\` (`one_line`).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Callable, Optional, TextIO

import torch

from dsgpt.errors import UserError
from dsgpt.generate import GREEDY, Sampling, TextRow, generate

RESET, EXIT = "/reset", "/exit"


@dataclass
class ChatModel:
    model: torch.nn.Module  # a GPT in eval mode
    tok: object  # tokenizers.Tokenizer
    spec: object  # dsgpt.data.chat.ChatSpec
    end_id: int  # ends a reply: the end-of-turn token, else the end-of-text token
    stop_ids: frozenset  # other ids that also end a reply (end of text)
    tag: str

    @property
    def block_size(self) -> int:
        return self.model.config.block_size


def load(run_dir, which: str = "latest", device: str = "auto") -> ChatModel:
    """A run's checkpoint with the tokenizer and chat template of its (chat) data dir."""
    from dsgpt.data.chat import read_spec
    from dsgpt.generate import resolve_device
    from dsgpt.runs import load_model, resolve_checkpoint, run_tokenizer, tokenizer_dir
    dev = resolve_device(device)
    cfg, _, _ = resolve_checkpoint(run_dir, which)  # a wrong --run fails before the weights are read
    spec = read_spec(tokenizer_dir(cfg), run_dir=run_dir)
    model, cfg, tag = load_model(run_dir, which)
    tok, eos = run_tokenizer(run_dir, cfg, tag, model.config.vocab_size)
    end = spec.end_of_turn_id if spec.end_of_turn_id is not None else eos
    return ChatModel(model.to(dev), tok, spec, end, frozenset({eos} - {end}), tag)


class ContextFull(UserError):
    """The system prompt and the new message leave no room for a reply."""


class ChatSession:
    """One conversation: `reply(text)` answers a user turn, `reset()` forgets the history."""

    def __init__(self, cm: ChatModel, system: Optional[str] = None, sampling: Sampling = GREEDY,
                 max_new_tokens: int = 256, seed: int = 0):
        self.cm, self.system, self.sampling, self.seed = cm, system, sampling, seed
        self.max_new_tokens = max_new_tokens
        # Room kept for the reply: it never has to slide the window past the system prompt.
        self.room = max(1, min(max_new_tokens, cm.block_size // 2))
        self.reset()

    def reset(self) -> None:
        self.history: list[dict] = []
        self.generator = torch.Generator().manual_seed(self.seed)  # a fresh session draws the same

    def prompt_ids(self, user: str) -> list[int]:
        """The ids the model is fed for the next reply: system prompt, as much history as fits
        (oldest exchanges dropped first), the new user turn and the generation prompt."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        turn = [{"role": "user", "content": user}]
        history = list(self.history)
        while True:
            ids = self._encode(head + history + turn)
            if len(ids) + self.room <= self.cm.block_size:
                return ids
            if not history:
                raise ContextFull(
                    f"This message and the system prompt take {len(ids)} tokens; with {self.room} kept for the "
                    f"reply, this model's context of {self.cm.block_size} tokens holds at most "
                    f"{self.cm.block_size - self.room}. Shorten the message (or the system prompt), or lower "
                    "--max-new-tokens.")
            history = history[2:]  # the oldest exchange: a user turn and its reply

    def reply(self, user: str, emit: Optional[Callable[[str], None]] = None) -> str:
        """The model's answer to `user` (streamed to `emit` piece by piece when given)."""
        ids = self.prompt_ids(user)
        row = TextRow(self.cm.tok, ids, emit=emit)
        stops = self.cm.stop_ids
        budget = min(self.max_new_tokens, self.cm.block_size - len(ids))
        generate(self.cm.model, [ids], budget, self.sampling, eos_id=self.cm.end_id,
                 vocab_size=self.cm.tok.get_vocab_size(), generator=self.generator,
                 on_token=lambda _, token: token in stops or row.push(token))
        text = row.finish().strip()
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        return text

    def _encode(self, messages: list[dict]) -> list[int]:
        text, _ = self.cm.spec.template.render(messages, add_generation_prompt=True)
        return list(self.cm.tok.encode(text, add_special_tokens=False).ids)


def one_line(text: str) -> str:
    """`text` with backslashes and newlines escaped, so a reply is one line of a script's output."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def converse(session: ChatSession, lines: TextIO, out: TextIO, interactive: bool, echo: bool = False) -> int:
    """Read user turns from `lines` until EOF or /exit; 0 when the conversation ended normally.
    `echo` (not interactive): a transcript, each turn as `you> ...` and `assistant> ...` lines."""
    def say(text: str) -> None:
        out.write(text)
        out.flush()

    def say_reply(piece: str) -> None:
        say(piece if interactive else one_line(piece))

    while True:
        if interactive:
            say("you> ")
        line = lines.readline()
        if not line:  # EOF (Ctrl-D)
            if interactive:
                say("\n")
            return 0
        text = line.rstrip("\n")
        command = text.strip()
        if command == EXIT:
            return 0
        if command == RESET:
            session.reset()
            if interactive:
                say("(history cleared)\n")
            continue
        if not command:
            continue
        if echo and not interactive:
            say(f"you> {one_line(text)}\n")
        if interactive or echo:
            say("assistant> ")
        try:
            session.reply(text, emit=say_reply)
        except ContextFull as err:
            if not interactive:
                raise
            say(f"\n[dsgpt] {err}\n")
            continue
        say("\n")


def main(args) -> int:
    """`dsgpt chat` with parsed arguments (dsgpt.cli)."""
    from dsgpt.generate import check_sampling_args
    temperature = 0.0 if args.greedy else args.temperature
    check_sampling_args(args.max_new_tokens, temperature, args.top_k, args.top_p, 1,
                        repetition_penalty=args.repetition_penalty)
    # Loading imports DeepSpeed, whose logger writes to stdout: stdout is for the replies alone.
    with contextlib.redirect_stdout(sys.stderr):
        cm = load(args.run, args.checkpoint, args.device)
    session = ChatSession(cm, system=args.system, max_new_tokens=args.max_new_tokens, seed=args.seed,
                          sampling=Sampling(temperature, args.top_k, args.top_p, args.repetition_penalty))
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"dsgpt chat: {args.run} ({cm.tag}), context {cm.block_size} tokens. {RESET} clears the history, "
              f"{EXIT} or Ctrl-D quits.", flush=True)
    try:
        return converse(session, sys.stdin, sys.stdout, interactive, echo=args.echo)
    except KeyboardInterrupt:
        print(flush=True)
        return 130
