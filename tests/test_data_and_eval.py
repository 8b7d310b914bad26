"""Calibration windows and perplexity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fasp_edge import load_model, perplexity
from fasp_edge.errors import CalibrationError, InvalidArgument
from fasp_edge.pipeline.calibration import calibration_windows, sample_windows, self_generated_windows
from fasp_edge.pipeline.perplexity import agreement

from .conftest import MODEL_BUILDERS, STORIES, TINYSTORIES, requires_shared


def test_windows_are_seeded_distinct_and_non_overlapping():
    ids = torch.arange(1000)
    a = sample_windows(ids, 7, 100, seed=3)
    assert a.shape == (7, 100)
    assert torch.equal(a, sample_windows(ids, 7, 100, seed=3))
    assert not torch.equal(a, sample_windows(ids, 7, 100, seed=4))
    starts = sorted(a[:, 0].tolist())
    assert all(b - s >= 100 for s, b in zip(starts, starts[1:]))
    assert all(torch.equal(w, torch.arange(w[0], w[0] + 100)) for w in a)  # contiguous text


def test_too_short_text_says_how_many_windows_it_gives():
    with pytest.raises(CalibrationError, match="gives only 9 windows of 100 tokens, not 10"):
        sample_windows(torch.arange(999), 10, 100, seed=0)


def test_calibration_needs_a_source():
    with pytest.raises(CalibrationError, match="--calib-file"):
        calibration_windows(None, nsamples=1, seqlen=8)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(InvalidArgument, match="wikitext2, c4"):
        calibration_windows(None, dataset="pile", nsamples=1, seqlen=8)


def test_missing_calibration_file():
    with pytest.raises(CalibrationError, match="does not exist"):
        calibration_windows(None, file="/nonexistent/calib.txt", nsamples=1, seqlen=8)


class _CharTokenizer:
    """Byte-level stand-in tokenizer: one id per character, BOS 1 at the start."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True, return_attention_mask=False):
        ids = [3 + (ord(c) % 90) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_perplexity_follows_the_standard_protocol():
    model = MODEL_BUILDERS["llama-gqa"]()
    tok = _CharTokenizer()
    text = "the quick brown fox jumps over the lazy dog " * 3  # 132 tokens, no BOS
    res = perplexity(model, tok, text, seqlen=32, progress=False)
    assert res["windows"] == 4 and res["tokens"] == 128 and res["predicted_tokens"] == 124
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:128]).view(4, 32)
    with torch.no_grad():
        lg = model(ids).logits
    nll = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert res["perplexity"] == pytest.approx(math.exp(nll), rel=1e-6)
    assert perplexity(model, tok, text, seqlen=32, max_windows=2, progress=False)["windows"] == 2
    with pytest.raises(InvalidArgument, match="fewer than one window"):
        perplexity(model, tok, "short", seqlen=32, progress=False)


@requires_shared(STORIES, TINYSTORIES)
def test_stories260k_reference_and_calibration_from_file():
    loaded = load_model(STORIES)
    tok = loaded.tokenizer
    ids = tok("One day, a clever fox found a shiny key under the old oak tree.", return_tensors="pt").input_ids
    assert ids.shape[1] == 35
    with torch.no_grad():
        nll = loaded.model(ids, labels=ids).loss.item() * 34
    assert nll == pytest.approx(54.404, abs=1e-2)
    cal = calibration_windows(tok, file=TINYSTORIES, nsamples=16, seqlen=128, seed=0)
    assert cal.windows.shape == (16, 128) and cal.description["file"] == TINYSTORIES.name


# ---------------------------------------------------------------- data-free calibration and agreement
@pytest.mark.slow
@requires_shared(STORIES)
def test_self_generated_windows_are_seeded_samples_from_bos():
    loaded = load_model(STORIES)
    a = self_generated_windows(loaded.model, loaded.tokenizer, nsamples=5, seqlen=24, seed=3, batch_size=2,
                               progress=False)
    b = self_generated_windows(loaded.model, loaded.tokenizer, nsamples=5, seqlen=24, seed=3, batch_size=2,
                               progress=False)
    c = self_generated_windows(loaded.model, loaded.tokenizer, nsamples=5, seqlen=24, seed=4, progress=False)
    assert a.windows.shape == (5, 24) and a.windows.dtype == torch.long
    assert (a.windows[:, 0] == loaded.tokenizer.bos_token_id).all()
    assert 0 <= int(a.windows.min()) and int(a.windows.max()) < loaded.model.config.vocab_size
    assert torch.equal(a.windows, b.windows) and not torch.equal(a.windows, c.windows)  # same seed, same text
    assert a.description["self_generated"] and a.description["temperature"] == 1.0
    assert a.description["sampler"] == "inverse-cdf" and a.description["batch"] == 2
    # real text from the model: TinyStories-like, so mostly ordinary tokens rather than noise
    text = loaded.tokenizer.decode(a.windows[0])
    assert len(text.split()) >= 5


def test_sampled_tokens_follow_the_softmax_and_never_draw_impossible_ones():
    from fasp_edge.pipeline.calibration import sample_tokens

    logits = torch.log(torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0]))  # tokens 1 and 4 impossible
    gen = torch.Generator().manual_seed(0)
    draws = sample_tokens(logits.expand(40_000, -1), gen)
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq[[0, 2, 3]], torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=0.01)
    again = sample_tokens(logits.expand(40_000, -1), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)  # seeded
    # a peaked row gives its argmax; rows are drawn independently
    peaked = torch.full((3, 7), -1e4)
    peaked[torch.arange(3), torch.tensor([6, 0, 3])] = 0.0
    assert sample_tokens(peaked, gen).tolist() == [6, 0, 3]


def test_sampling_batch_is_capped_by_the_kv_cache_it_needs():
    from types import SimpleNamespace

    from fasp_edge.pipeline.calibration import SELF_CACHE_BYTES, _sampling_batch

    small = SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, num_attention_heads=9, hidden_size=576)
    assert _sampling_batch(small, 256, 32) == 32
    big = SimpleNamespace(num_hidden_layers=32, num_key_value_heads=32, num_attention_heads=32, hidden_size=4096)
    per_row = 2 * 32 * 4096 * 2048 * 4
    assert _sampling_batch(big, 2048, 32) == max(1, SELF_CACHE_BYTES // per_row) < 32


@requires_shared(STORIES)
def test_self_generated_windows_reject_bad_settings():
    loaded = load_model(STORIES)
    with pytest.raises(InvalidArgument, match="temperature must be > 0"):
        self_generated_windows(loaded.model, loaded.tokenizer, nsamples=1, seqlen=8, temperature=0)
    with pytest.raises(InvalidArgument, match="exceeds the model's"):
        self_generated_windows(loaded.model, loaded.tokenizer, nsamples=1, seqlen=100_000)


@pytest.mark.slow
@requires_shared(STORIES)
def test_agreement_is_perfect_with_itself_and_lower_after_pruning():
    from fasp_edge import prune

    dense = load_model(STORIES)
    pruned = load_model(STORIES)
    cal = self_generated_windows(dense.model, dense.tokenizer, nsamples=8, seqlen=64, seed=0, progress=False)
    held_out = self_generated_windows(dense.model, dense.tokenizer, nsamples=4, seqlen=64, seed=1, progress=False)
    same = agreement(dense.model, dense.model, held_out.windows, progress=False)
    assert same["top1_agreement"] == 1.0 and abs(same["mean_kl"]) < 1e-6 and same["positions"] == 256
    prune(pruned.model, sparsity=0.3, calibration=cal.windows, progress=False)
    got = agreement(dense.model, pruned.model, held_out.windows, progress=False)
    assert 0.3 < got["top1_agreement"] < 1.0 and got["mean_kl"] > 0
