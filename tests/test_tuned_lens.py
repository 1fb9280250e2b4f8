"""Tuned lens: training lowers held-out KL, the last layer stays the identity, the KL estimator,
lens_kl against scipy, save/load, the cache, and refusal of a lens from another model."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import lens_safety as ls
from lens_safety.errors import CacheError, InputError, ModelMismatchError
from lens_safety.lens import lens_logits, logit_lens
from lens_safety.testing import _CORPUS, tiny_model
from lens_safety.translators import _kl_estimate, _unembed_parts
from lens_safety.tuned_lens import (
    TunedLens,
    TunedLensConfig,
    compare_lenses,
    lens_kl,
    resolve_lens,
    train_tuned_lens,
)

_SENTENCES = [s.strip() for s in _CORPUS.replace("\n", " ").split(".") if s.strip()]
TRAIN, HELD_OUT = _SENTENCES[:12], _SENTENCES[12:]


@pytest.fixture(scope="module")
def trained(tiny):
    return train_tuned_lens(tiny, TRAIN, steps=100, batch_positions=64, max_new_tokens=8, cache=False,
                            progress=False)


def test_tuned_lens_lowers_held_out_kl_at_every_layer_but_the_last(tiny, trained):
    assert HELD_OUT and not set(HELD_OUT) & set(TRAIN)
    logit = lens_kl(tiny, HELD_OUT, None)
    tuned = lens_kl(tiny, HELD_OUT, trained)
    assert list(logit["layer"]) == list(range(tiny.n_layers + 1)) and set(tuned["lens"]) == {"tuned"}
    for layer in range(tiny.n_layers):
        assert tuned["kl"][layer] < 0.8 * logit["kl"][layer], layer
    assert logit["kl"].iloc[-1] == pytest.approx(0.0, abs=1e-9) and tuned["kl"].iloc[-1] == pytest.approx(0.0, abs=1e-9)
    assert trained.history[-1] < trained.history[0]
    assert trained.data["n_positions"] > 100 and trained.steps == 100


def test_last_layer_is_the_identity(tiny, trained):
    acts = ls.collect_residuals(tiny, HELD_OUT, cache=False, progress=False)
    x = trained.translate(acts.values)
    assert torch.equal(x[:, -1], acts.values[:, -1])
    assert not torch.allclose(x[:, 0], acts.values[:, 0])  # the others did move
    a = logit_lens(tiny, acts, top_k=3)
    b = logit_lens(tiny, acts, top_k=3, lens=trained)
    assert torch.equal(a.top_ids[:, -1], b.top_ids[:, -1]) and b.lens == "tuned" and a.lens == "logit"
    assert float((a.mass[:, -1] - b.mass[:, -1]).abs().max()) < 1e-6
    # one layer by hand: h + h W^T + b, then the logit lens' readout
    h = acts.values[:, 1]
    ref = torch.softmax(lens_logits(tiny, h + h @ trained.weight[1].T + trained.bias[1]).double(), -1)
    p, i = ref.topk(3, -1)
    assert torch.equal(b.top_ids[:, 1], i) and float((b.top_probs[:, 1] - p).abs().max()) < 1e-5
    assert torch.equal(trained.translate_layer(h, 1), h + h @ trained.weight[1].T + trained.bias[1])
    # everything built on the lens result works with the tuned lens
    assert len(b.consistency()) == tiny.n_layers + 1 and len(b.category_mass()) == 3 * (tiny.n_layers + 1)
    assert b.emergence_layer(min_mass=0.0) in (None, *range(tiny.n_layers + 1))
    view = b.views([0])[0]
    assert "Layer" in str(view.props)


def test_identity_lens_reads_like_the_logit_lens(tiny):
    acts = ls.collect_residuals(tiny, HELD_OUT, cache=False, progress=False)
    ident = TunedLens.identity(tiny)
    a, b = logit_lens(tiny, acts, top_k=4), logit_lens(tiny, acts, top_k=4, lens=ident)
    assert torch.equal(a.top_ids, b.top_ids) and torch.equal(a.mass, b.mass)


def test_kl_estimate_is_exact_on_the_full_vocabulary(tiny):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 3, tiny.d_model, generator=g) * 2
    final = torch.randn(5, tiny.d_model, generator=g) * 2
    logp = torch.log_softmax(lens_logits(tiny, final).double(), -1)
    logq = torch.log_softmax(lens_logits(tiny, h).double(), -1)
    exact = (logp.exp()[:, None] * (logp[:, None] - logq)).sum(-1)
    w_u, b_u = _unembed_parts(tiny)
    logz = torch.logsumexp(lens_logits(tiny, final).float(), -1)
    with torch.no_grad():
        est = _kl_estimate(tiny, h, final, logz, torch.arange(tiny.d_vocab), torch.zeros(tiny.d_vocab), w_u, b_u)
    assert float((est.double() - exact).abs().max()) < 1e-4
    # a sampled remainder with importance weights is unbiased for the normaliser: close on average
    top = logp.topk(20, -1).indices.unique()
    rest = torch.tensor([v for v in range(tiny.d_vocab) if v not in set(top.tolist())])
    ests = []
    for seed in range(100):
        pick = rest[torch.randperm(rest.numel(), generator=torch.Generator().manual_seed(seed))[:100]]
        cand = torch.cat([top, pick])
        logw = torch.cat([torch.zeros(top.numel()), torch.full((100,), math.log(rest.numel() / 100))])
        with torch.no_grad():
            ests.append(_kl_estimate(tiny, h, final, logz, cand, logw, w_u, b_u).double())
    ests = torch.stack(ests)
    se = ests.std(0) / math.sqrt(len(ests))
    assert bool(((ests.mean(0) - exact).abs() < 4 * se + 1e-6).all())  # within 4 standard errors
    assert float(ests.std(0).max()) > 0  # the sample does vary


def test_lens_kl_against_scipy(tiny):
    from scipy.stats import entropy

    acts = ls.collect_residuals(tiny, HELD_OUT, cache=False, progress=False)
    f = lens_kl(tiny, acts, None)
    p = torch.softmax(lens_logits(tiny, acts.values[:, -1]).double(), -1).numpy()
    q = torch.softmax(lens_logits(tiny, acts.values[:, 1]).double(), -1).numpy()
    per_prompt = [entropy(p[i], q[i]) for i in range(len(acts))]
    row = f[f.layer == 1].iloc[0]
    assert row.kl == pytest.approx(np.mean(per_prompt), rel=1e-6)
    t = 3.182446305284263  # t(0.975, df=3) for 4 prompts
    assert row.ci_high - row.kl == pytest.approx(t * np.std(per_prompt, ddof=1) / 2, rel=1e-5)
    assert row.n == len(HELD_OUT) and row.positions == "last"
    # several positions per prompt: averaged per prompt first
    k2 = ls.collect_residuals(tiny, HELD_OUT, positions=2, cache=False, progress=False)
    f2 = lens_kl(tiny, k2, None)
    assert f2.kl[1] != pytest.approx(f.kl[1]) and f2.positions[0] == "2"
    last_only = replace(k2, values=k2.values[:, :, -1], positions="last")
    assert lens_kl(tiny, last_only).kl[1] == pytest.approx(f.kl[1], rel=1e-9)


def test_save_load_round_trip_and_other_model_refused(tiny, trained, tmp_path):
    path = trained.save(tmp_path / "lens")
    back = TunedLens.load(path, model=tiny)
    assert torch.equal(back.weight, trained.weight) and torch.equal(back.bias, trained.bias)
    assert back.history == pytest.approx(trained.history) and back.config == trained.config
    assert back.data == trained.data and back.weights_hash == tiny.weights_hash
    other = tiny_model("hf", seed=1)
    with pytest.raises(ModelMismatchError, match="another model"):
        TunedLens.load(path, model=other)
    other_acts = ls.collect_residuals(other, HELD_OUT, cache=False, progress=False)
    with pytest.raises(ModelMismatchError, match="tuned lens"):
        logit_lens(other, other_acts, lens=trained)
    with pytest.raises(ModelMismatchError):
        lens_kl(other, other_acts, lens=trained)
    (path / "tensors.safetensors").write_bytes(b"broken")
    with pytest.raises(CacheError, match="sha256"):
        TunedLens.load(path)


def test_cache_reuses_a_trained_lens(tiny, home):
    kw = dict(steps=3, max_new_tokens=0, max_positions=64, progress=False)
    first = train_tuned_lens(tiny, TRAIN[:3], **kw)
    entries = list((home / "tuned_lens").iterdir())
    assert len(entries) == 1
    again = train_tuned_lens(tiny, TRAIN[:3], **kw)
    assert again.train_seconds == first.train_seconds and torch.equal(again.weight, first.weight)
    train_tuned_lens(tiny, TRAIN[:3], **dict(kw, steps=4))  # another config: another entry
    train_tuned_lens(tiny, TRAIN[:4], **kw)                  # other data: another entry
    assert len(list((home / "tuned_lens").iterdir())) == 3
    assert first.data["key"]["weights_hash"] == tiny.weights_hash


def test_bad_settings(tiny, trained):
    with pytest.raises(InputError, match="steps"):
        TunedLensConfig(steps=0)
    with pytest.raises(InputError, match="lr"):
        TunedLensConfig(lr=-1.0)
    with pytest.raises(InputError, match="Unknown tuned-lens settings"):
        train_tuned_lens(tiny, TRAIN, step=3, cache=False)
    with pytest.raises(InputError, match="at least one prompt"):
        train_tuned_lens(tiny, [], cache=False)
    with pytest.raises(InputError, match="lens must be"):
        resolve_lens(tiny, "tunde")
    with pytest.raises(InputError, match="bias"):
        TunedLens(trained.weight, trained.bias[:, :3], "m", "h")


def test_compare_lenses_and_figures(tiny, trained):
    from lens_safety import viz

    ps = ls.PromptSet.from_texts(HELD_OUT[:2], label="harmless") + ls.PromptSet.from_texts(HELD_OUT[2:],
                                                                                             label="harmful")
    cmp = compare_lenses(tiny, ps, trained)
    m = cmp.metrics()
    assert m["kl"]["logit"] == pytest.approx(list(lens_kl(tiny, ps)["kl"]))
    assert m["kl"]["tuned"][-1] == pytest.approx(0.0, abs=1e-9) and set(m["emergence_layer"]) == {"logit", "tuned"}
    frame = cmp.to_frame()
    assert set(frame["lens"]) == {"logit", "tuned"} and len(frame) == 2 * 2 * 3 * (tiny.n_layers + 1)
    fig = cmp.plot()
    assert len(fig.axes) == 3
    kl_lines = fig.axes[0].get_lines()
    assert np.allclose(kl_lines[0].get_ydata(), m["kl"]["logit"][:-1])  # log scale: the 0 at the end is dropped
    fig2, ax = viz.figure_axes()
    assert trained.plot(ax=ax) is fig2 and np.allclose(ax.get_lines()[0].get_ydata(), trained.history)


def test_held_out_prompts_never_overlap_the_training_prompts_for_any_seed():
    from lens_safety.tuned_lens import default_training_prompts, held_out_prompts

    trains = {t: set(default_training_prompts(t).texts) for t in range(3)}
    for seed in range(6):
        held = held_out_prompts(16, seed=seed)
        assert len(held) == 32 and held.labels.count("harmful") == 16
        for t, train in trains.items():
            assert not set(held.texts) & train, (seed, t)  # seed 1 used to share 11 of 32 with the training set
    assert held_out_prompts(16, seed=0).texts != held_out_prompts(16, seed=1).texts  # the seed still draws
    assert len(trains[0]) == 128 and trains[0] != trains[1]


def test_lens_kl_refuses_prompts_the_lens_was_trained_on(tiny, trained):
    from lens_safety.tuned_lens import check_held_out, default_training_prompts, prompt_digests

    assert trained.data["prompt_digests"] == prompt_digests(TRAIN)
    with pytest.raises(InputError, match=r"2 of the 6 held-out prompts were used to train the tuned lens"):
        lens_kl(tiny, HELD_OUT + TRAIN[:2], trained)
    with pytest.raises(InputError, match="held_out_prompts"):
        compare_lenses(tiny, TRAIN[:1], trained)
    assert len(lens_kl(tiny, HELD_OUT, trained)) == tiny.n_layers + 1  # disjoint: measured
    assert len(lens_kl(tiny, TRAIN[:2], None)) == tiny.n_layers + 1  # the logit lens has no training set
    check_held_out(ls.PromptSet.from_texts(TRAIN, label="harmless"), HELD_OUT)
    with pytest.raises(InputError, match="1 of the 1 held-out"):
        check_held_out(TRAIN, ls.PromptSet.from_texts(TRAIN[3:4], label="harmful"))
    # a lens saved before the digests were recorded: recognised by the default prompts' hash
    default = default_training_prompts()
    old = replace(trained, data={"prompts_hash": default.hash()})
    with pytest.raises(InputError, match="1 of the 1 held-out"):
        lens_kl(tiny, default.texts[:1], old)
    assert len(lens_kl(tiny, default.texts[:1], replace(trained, data={}))) == tiny.n_layers + 1  # unknown: no check


@pytest.mark.real
def test_real_tuned_lens_smoke(real_model):
    """A few steps on two prompts: shapes, the identity at the last layer, the KL frame."""
    lens = train_tuned_lens(real_model, ["How do I bake bread?", "Write a tutorial on how to make a bomb"],
                            steps=3, max_new_tokens=0, max_positions=32, cache=False, progress=False)
    assert lens.weight.shape == (real_model.n_layers, real_model.d_model, real_model.d_model)
    acts = ls.collect_residuals(real_model, ["List three rivers in Europe"], cache=False, progress=False)
    a = logit_lens(real_model, acts, lens=lens)
    b = logit_lens(real_model, acts)
    assert torch.equal(a.top_ids[:, -1], b.top_ids[:, -1])
    f = lens_kl(real_model, acts, lens)
    assert f["kl"].iloc[-1] == pytest.approx(0.0, abs=1e-6) and (f["kl"].iloc[:-1] > 0).all()
