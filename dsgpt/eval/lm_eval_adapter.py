"""lm-evaluation-harness on a dsgpt run: a model class (`dsgpt` in lm-eval's registry) that scores
and generates with dsgpt's own GPT and the run's tokenizer, and `run_tasks`, which runs tasks on a
run's checkpoint offline and returns {task: {metric: value}}.

Scoring follows lm-eval's HFLM step for step (same tokenization of context/continuation, same left
truncation, same rolling windows, log-softmax over the whole padded vocabulary), so a run and its
`dsgpt export` give the same numbers under both backends.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Optional, Sequence

# Tasks read local files here; a dataset that needs the Hub must fail at once, not hang on the
# network. Set before datasets/lm_eval are imported, which read these at import time.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.utils import (Collator, handle_stop_sequences, normalize_gen_kwargs,  # noqa: E402
                                  postprocess_generated_text)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dsgpt import dist  # noqa: E402
from dsgpt.errors import UserError  # noqa: E402
from dsgpt.eval.rng_guard import keep_rng  # noqa: E402

DTYPES = ("fp32", "bf16")


@register_model("dsgpt")
class DsgptLM(TemplateLM):
    """A dsgpt run's checkpoint as an lm-eval model.

    TemplateLM supplies `loglikelihood` (empty contexts get the EOS as prefix; trailing spaces move
    to the continuation; context+continuation are encoded whole and split), as HFLM does."""

    backend = "causal"

    def __init__(self, run_dir=None, checkpoint: str = "latest", batch_size=8, device: str = "cpu",
                 dtype: str = "fp32", max_gen_toks: int = 256, run=None, loaded=None, tokenizer=None,
                 seed: int = 1234, **unused):
        """A run's checkpoint (`run_dir`/`run`, `checkpoint`), or a model already loaded: `loaded`
        (a dsgpt.eval.loaded.LoadedModel) with `tokenizer` = (tokenizer, EOS id)."""
        super().__init__()
        if loaded is None:
            loaded, tokenizer = _load(run_dir or run, checkpoint, device, dtype)
        self.lm = loaded
        self.model = loaded.forward
        self.tok, self.eos = tokenizer
        self._device = loaded.device
        if loaded.splits:  # lm-eval hands each rank its share of the requests and gathers the results
            self._rank, self._world_size = loaded.rank, loaded.world_size
        # lm-eval passes batch_size as a string from the command line; "auto" is not supported.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)  # sampled generations: the same draws on every rank and every run
        self.progress = True

    # ---- what lm-eval asks of a model ----------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.eos

    @property
    def max_length(self) -> int:
        return self.lm.config.block_size

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        from dsgpt.data.tokenizer import vocab_hash
        return f"dsgpt:{vocab_hash(self.tok)}"

    # ---- several ranks, each with the whole model (ZeRO-3 ranks run every request in lockstep) ---

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        import torch.distributed as td
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        td.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        import torch.distributed as td
        out = [None] * self.world_size if self.rank == dst else None
        td.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as td
            td.barrier()

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        # dsgpt tokenizers add no special tokens, so the flag changes nothing.
        return self.tok.encode(string).ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ---- scoring -------------------------------------------------------------------------------

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), whether greedy decoding gives it) per request, in order.

        Longest first (padding stays small), right padded: causal attention never looks at it."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        res = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm or not self.progress, desc="dsgpt loglikelihood")
        for chunk in order.get_batched(n=self.batch_size):
            rows = [self._window(ctx, cont) for _, ctx, cont in chunk]
            logprobs = self._logprobs(rows)
            for (key, _, cont), row, lp in zip(chunk, rows, logprobs):
                answer = self._score(lp[len(row) - len(cont):len(row)], cont)
                res.append(answer)
                if key is not None:  # rolling windows are cached per text, not per window
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                pbar.update(1)
        pbar.close()
        return order.get_original(res)

    def _window(self, context: list[int], continuation: list[int]) -> list[int]:
        """The model's input: context+continuation less its last token, cut from the left to fit."""
        if not context or not continuation or len(continuation) > self.max_length:
            raise ValueError(f"a request needs a context and a continuation of 1 to {self.max_length} tokens "
                             f"(block_size); got {len(context)} and {len(continuation)}")
        return (context + continuation)[-(self.max_length + 1):][:-1]

    def _logprobs(self, rows: list[list[int]]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, :len(r)] = torch.tensor(r)
        with self.lm.precision():
            logits = self.model(batch.to(self._device))
        return F.log_softmax(logits.float(), dim=-1).cpu()

    @staticmethod
    def _score(logprobs: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
        target = torch.tensor(continuation)
        greedy = bool((logprobs.argmax(-1) == target).all())
        return float(logprobs.gather(1, target[:, None]).sum()), greedy

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of up to block_size predicted tokens;
        the first window is conditioned on the EOS token alone."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ----------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations in batches of requests with the same generation settings, longest first;
        each stops at the EOS, at a stop string (cut before it) or after max_gen_toks."""
        eos_text = self.tok_decode([self.eos], skip_special_tokens=False)
        order = Collator([req.args for req in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                         group_by="gen_kwargs", group_fn=lambda a: a[1])
        out = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm or not self.progress, desc="dsgpt generate_until")
        for chunk in order.get_batched(n=self.batch_size):
            kwargs = normalize_gen_kwargs(chunk[0][1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            texts = self._continue([self.tok_encode(context) for context, _ in chunk], until, kwargs)
            for (context, gen_kwargs), text in zip(chunk, texts):
                text = postprocess_generated_text(text, stop=until, think_end_token=None)
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                pbar.update(1)
        pbar.close()
        return order.get_original(out)

    @torch.no_grad()
    def _continue(self, prompts: list[list[int]], until: list[str], kwargs: dict) -> list[str]:
        """The text after each prompt (an empty one starts from the EOS), as one batch."""
        from dsgpt.generate import Sampling, TextRow, generate
        prompts = [p[-self.max_length:] or [self.eos] for p in prompts]
        rows = [TextRow(self.tok, p, until) for p in prompts]
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample", True) else 0.0
        sampling = Sampling(temperature, None, kwargs.get("top_p"), 1.0)
        with self.lm.precision():
            generate(self.model, prompts, int(kwargs["max_gen_toks"]), sampling, eos_id=self.eos,
                     vocab_size=self.tok.get_vocab_size(), device=self._device,
                     generator=torch.Generator().manual_seed(self.seed),
                     on_token=lambda row, token: rows[row].push(token))
        return [row.finish() for row in rows]


def _load(run_dir, checkpoint: str, device: str, dtype: str):
    """(LoadedModel, (tokenizer, EOS id)) of a run's checkpoint, for model_args 'run=runs/NAME'."""
    from dsgpt import runs
    from dsgpt.eval import loaded
    if run_dir is None:
        raise UserError("The dsgpt lm-eval model needs a run dir: model_args 'run=runs/NAME'.")
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r} is not supported: use one of {', '.join(DTYPES)}.")
    with keep_rng():  # building the model draws its (then overwritten) initial weights
        lm, cfg = loaded.load(run_dir, checkpoint, device, dtype)
    return lm, runs.run_tokenizer(run_dir, cfg, lm.tag, lm.config.vocab_size)


# ---- running tasks ---------------------------------------------------------------------------------

_TASK_MANAGERS: dict = {}


def task_manager(include_path=None):
    """lm-eval's TaskManager, built once per process and include path: it indexes thousands of
    task YAMLs, which takes seconds."""
    paths = tuple(str(Path(p).expanduser().resolve()) for p in _as_list(include_path))
    if paths not in _TASK_MANAGERS:
        from lm_eval.tasks import TaskManager
        for p in paths:
            if not Path(p).is_dir():
                raise UserError(f"--include-path {p} is not a folder: give the folder that holds your task YAMLs.")
        _TASK_MANAGERS[paths] = TaskManager(include_path=list(paths) or None)
    return _TASK_MANAGERS[paths]


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, (str, Path)) else list(value)


def check_task_names(tasks: Sequence[str], manager) -> None:
    """A UserError naming the closest known names for each task lm-eval does not know."""
    known = manager.all_tasks
    problems = []
    for name in tasks:
        if name in known or manager.match_tasks([name]):
            continue
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        problems.append(f"'{name}' (closest: {', '.join(close) if close else 'none'})")
    if problems:
        raise UserError(f"Unknown lm-eval task {'; '.join(problems)}. Pick a name from the lm_eval task list, or "
                        f"add a folder of your own task YAMLs with --include-path DIR.")


def _needs_download(err: BaseException) -> Optional[str]:
    """The message of the offline/network error behind `err`, when a dataset had to be fetched."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    while err is not None:
        if isinstance(err, (ConnectionError, OfflineModeIsEnabled, LocalEntryNotFoundError)):
            return str(err)
        err = err.__cause__ or err.__context__
    return None


def _go_offline() -> None:
    """Offline mode even when datasets/huggingface_hub were imported before this module."""
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets.config
    import huggingface_hub.constants
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    if hasattr(datasets.config, "HF_DATASETS_OFFLINE"):
        datasets.config.HF_DATASETS_OFFLINE = True


def flat_results(results: dict) -> dict:
    """{task: {metric: value}} from lm-eval's results: numbers only; 'acc,none' becomes 'acc'."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        flat[task] = {(k[:-len(",none")] if k.endswith(",none") else k): v for k, v in metrics.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return flat


def run_tasks(run_dir, tasks: Sequence[str] | str, include_path=None, checkpoint: str = "latest",
              limit=None, num_fewshot: Optional[int] = None, batch_size: int = 8, device: str = "cpu",
              dtype: str = "fp32", offline: bool = True, fewshot_seed: Optional[int] = 1234,
              bootstrap_iters: int = 100000, model: Optional[DsgptLM] = None, progress: bool = True) -> dict:
    """Run lm-eval `tasks` on a run's checkpoint (or on `model`, a DsgptLM); {task: {metric: value}}
    on every rank.

    No global seed is set and the RNG states are restored afterwards. Few-shot examples come from
    lm-eval's own generator (`fewshot_seed`), which draws nothing from the global RNGs."""
    import lm_eval
    if offline:
        _go_offline()
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    manager = task_manager(include_path)
    check_task_names(tasks, manager)
    with keep_rng():
        lm = model or DsgptLM(run_dir, checkpoint=checkpoint, batch_size=batch_size, device=device, dtype=dtype)
        lm.progress = progress
        try:
            results = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                log_samples=False, bootstrap_iters=bootstrap_iters, random_seed=None, numpy_random_seed=None,
                torch_random_seed=None, fewshot_random_seed=fewshot_seed)
        except Exception as err:
            why = _needs_download(err)
            if why is None:
                raise
            raise UserError(
                f"The lm-eval task(s) {', '.join(tasks)} need a dataset that is not on this machine ({why}); "
                f"dsgpt runs lm-eval offline. Put the data in a local JSONL file and describe the task in a "
                f"YAML in a folder passed with --include-path DIR, e.g. `task: my_task`, `dataset_path: json`, "
                f"`dataset_kwargs: {{data_files: {{test: /path/FILE.jsonl}}}}`, `test_split: test`, plus "
                f"doc_to_text/doc_to_choice/doc_to_target as the original task's YAML has them.") from None
    flat = flat_results(results) if results else {}
    # lm-eval returns results in one process per launch (rank 0, LOCAL_RANK 0): every rank gets them.
    return dist.broadcast_object(flat)
