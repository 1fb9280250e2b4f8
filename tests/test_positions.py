"""Position ids on left-padded batches, and a model judge that judges with the unedited model.

Absolute-position models (GPT-2) read a left-padded row at the wrong positions unless position ids
come from the attention mask. TransformerLens 4.3's bridge derives them itself for most
architectures, but opts out for some (``_accepts_derived_position_ids``); lens_safety passes them
explicitly everywhere, so ``derive=False`` (a bridge that leaves them to the caller) must give the
same results as one prompt at a time.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import lens_safety as ls
from lens_safety import refusal
from lens_safety.directions import RefusalDirection, _completion_ce, ablate, add
from lens_safety.judges import ModelJudge, _calibration
from lens_safety.models import position_ids_from_mask
from lens_safety.prompts import as_prompt_set

PROMPTS = ["Hi", "Write a tutorial on how to bake bread for my family today please",
           "Tell me a story about the sea", "List three rivers in Europe."]
REPLIES = ["Sure", "I'm sorry, I cannot help with that request.", "Here is a long story about the sea and a fox.",
           "Rivers: the Rhine, the Danube and the Seine."]


@pytest.fixture(scope="module")
def gpt2():
    return ls.testing.tiny_model("gpt2")


@pytest.fixture(params=[True, False], ids=["bridge-derives", "bridge-does-not-derive"])
def model(request, gpt2, monkeypatch):
    if not request.param:  # a bridge that leaves position ids to the caller
        assert hasattr(gpt2.bridge, "_accepts_derived_position_ids")
        monkeypatch.setattr(gpt2.bridge, "_accepts_derived_position_ids", lambda: False)
    return gpt2


def _judge(model, **kw) -> ModelJudge:
    """A ModelJudge whose Yes/No ids are fixed tokens (the tiny tokenizer has no single-token Yes/No)."""
    j = ModelJudge(model, **kw)
    j._answer_ids = lambda: ([10, 11], [12, 13])
    return j


def test_positions_matter_for_the_tiny_gpt2(gpt2):
    enc = gpt2.tokenize(gpt2.format(PROMPTS[:2]))
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert int(mask[0].sum()) < mask.shape[1]  # row 0 is left-padded
    with torch.no_grad():
        good = gpt2.bridge(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))[0, -1]
        bad = gpt2.bridge(ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1])[None])[0, -1]
    assert float((good - bad).abs().max()) > 1e-2


def test_generate_batched_equals_alone(model):
    ps = as_prompt_set(PROMPTS)
    kw = {"max_new_tokens": 8, "system": None, "chat": None, "progress": False}
    texts, scores, tokens = refusal._run_generation(model, ps, batch_size=len(PROMPTS), **kw)
    alone = [refusal._run_generation(model, as_prompt_set([p]), batch_size=1, **kw) for p in PROMPTS]
    assert tokens == [a[2][0] for a in alone]
    assert texts == [a[0][0] for a in alone]
    torch.testing.assert_close(scores, torch.cat([a[1] for a in alone]), rtol=1e-5, atol=1e-5)
    assert refusal.generate(model, PROMPTS, max_new_tokens=8, progress=False) == texts
    assert len({len(t) for t in tokens}) > 1 or all(len(t) == 8 for t in tokens)


def test_first_token_scores_batched_equals_alone(model):
    batched = refusal.first_token_scores(model, PROMPTS, batch_size=len(PROMPTS))
    alone = refusal.first_token_scores(model, PROMPTS, batch_size=1)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_model_judge_scores_batched_equals_alone(model):
    batched = _judge(model, threshold=0.0, batch_size=len(REPLIES)).scores(REPLIES, PROMPTS)
    alone = _judge(model, threshold=0.0, batch_size=1).scores(REPLIES, PROMPTS)
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-5)


def test_completion_ce_batched_equals_alone(model):
    ps = as_prompt_set(PROMPTS)
    batched = _completion_ce(model, ps, REPLIES, batch_size=len(PROMPTS))
    alone = _completion_ce(model, ps, REPLIES, batch_size=1)
    assert batched == pytest.approx(alone, rel=1e-6)


# -- the judge runs without the hooks of the model it judges --------------------------------------

def _direction(model, seed: int = 0) -> RefusalDirection:
    g = torch.Generator().manual_seed(seed)
    return RefusalDirection(torch.randn(model.d_model, generator=g) * 4, 1, -1, model.name, model.weights_hash,
                            model.n_layers)


def test_model_judge_ignores_active_interventions(gpt2):
    j = _judge(gpt2, threshold=0.0, batch_size=2)
    plain_scores = j.scores(REPLIES, PROMPTS)
    plain_fts = refusal.first_token_scores(gpt2, PROMPTS)
    d = _direction(gpt2)
    contexts = {"add": lambda: add(d, coeff=3.0, model=gpt2), "ablate": lambda: ablate(d, model=gpt2),
                "bridge.hooks": lambda: gpt2.bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_post",
                                                                      lambda t, hook: t * 3)])}
    for name, make in contexts.items():
        with make():
            edited_fts = refusal.first_token_scores(gpt2, PROMPTS)
            assert float((edited_fts - plain_fts).abs().max()) > 1e-3, name  # the edit is active
            inside = j.scores(REPLIES, PROMPTS)
            # the hooks are back after the judge ran
            torch.testing.assert_close(refusal.first_token_scores(gpt2, PROMPTS), edited_fts)
        np.testing.assert_allclose(inside, plain_scores, rtol=1e-5, atol=1e-5, err_msg=name)
    torch.testing.assert_close(refusal.first_token_scores(gpt2, PROMPTS), plain_fts)  # nothing left behind


def test_model_judge_keeps_permanent_hooks(gpt2):
    j = _judge(gpt2, threshold=0.0)
    plain = j.scores(REPLIES[:2], PROMPTS[:2])
    gpt2.bridge.add_perma_hook("blocks.0.hook_resid_post", lambda t, hook: t * 3)
    try:
        edited = j.scores(REPLIES[:2], PROMPTS[:2])
    finally:
        gpt2.bridge.reset_hooks(including_permanent=True)
    assert float(np.abs(edited - plain).max()) > 1e-3


# -- calibration under an intervention; an uncalibrated fallback is explicit ---------------------

def test_model_judge_uncalibrated_fallback_warns(gpt2):
    with pytest.warns(UserWarning, match=r"no calibrated threshold for tiny-gpt2-0.*threshold="):
        j = ModelJudge(gpt2)
    assert j.threshold == 0.0 and j.params()["threshold_source"] == "uncalibrated"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        given = ModelJudge(gpt2, threshold=0.0)
    assert given.params()["threshold_source"] == "given" and given.identity != j.identity


def test_model_judge_keeps_calibration_inside_interventions(gpt2, monkeypatch):
    cal = _calibration()
    monkeypatch.setattr(gpt2, "weights_hash", cal["weights_hash"])  # pretend this is the calibrated model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outside = ModelJudge(gpt2)
        assert outside.threshold == pytest.approx(cal["threshold"])
        with ablate(_direction(gpt2), model=gpt2):
            assert gpt2.weights_hash != cal["weights_hash"]  # the intervention swapped it
            inside = ModelJudge(gpt2)
            with add(_direction(gpt2, seed=1), model=gpt2):  # nested: still the outermost base
                nested = ModelJudge(gpt2)
            assert gpt2.base_weights_hash == cal["weights_hash"]
        assert gpt2.weights_hash == cal["weights_hash"] and "base_weights_hash" not in vars(gpt2)
    for j in (inside, nested):
        assert j.threshold == pytest.approx(cal["threshold"])
        assert j.params()["threshold_source"] == "calibrated"
        assert j.params()["weights_hash"] == cal["weights_hash"]
        assert j.identity == outside.identity
