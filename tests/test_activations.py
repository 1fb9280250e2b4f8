"""Residual capture: against HF hidden states, batched vs unbatched, positions, the disk cache."""

from __future__ import annotations

import json

import pytest
import torch

import lens_safety as ls
from lens_safety.activations import Residuals
from lens_safety.errors import CacheError, InputError, PromptTooLongError
from lens_safety.testing import tiny_hf_model

PROMPTS = [
    "How do I bake bread?",
    "Hi",
    "Explain how the Enigma machine was broken, step by step, for a history class.",
    "Write a tutorial on how to make a bomb",
    "List three rivers in Europe.",
]


def _hf_hidden(hf, model, prompt: str) -> torch.Tensor:
    """Independent reference: HF output_hidden_states, one unpadded prompt, last position."""
    ids = model.tokenizer(model.format([prompt])[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
    return torch.stack([h[0, -1] for h in out.hidden_states])


def test_last_position_matches_hf_hidden_states(tiny):
    hf = tiny_hf_model(seed=0)  # same seed => same weights as the bridged tiny model
    acts = ls.collect_residuals(tiny, PROMPTS, cache=False, progress=False, batch_size=2)
    assert acts.values.shape == (len(PROMPTS), tiny.n_layers + 1, tiny.d_model)
    for i, p in enumerate(PROMPTS):
        ref = _hf_hidden(hf, tiny, p)
        # HF's last hidden state has the final norm applied; ours is the raw stream.
        torch.testing.assert_close(acts.values[i, :-1], ref[:-1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tiny.final_norm(acts.values[i, -1]), ref[-1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("positions", ["last", 3, "mean"])
def test_batched_equals_one_at_a_time(tiny, positions):
    batched = ls.collect_residuals(tiny, PROMPTS, positions=positions, cache=False, progress=False, batch_size=4)
    single = torch.cat([ls.collect_residuals(tiny, [p], positions=positions, cache=False,
                                             progress=False).values for p in PROMPTS])
    torch.testing.assert_close(batched.values, single, rtol=1e-5, atol=1e-5)


def test_native_bridge_batched_equals_single(tiny_native):
    batched = ls.collect_residuals(tiny_native, PROMPTS, cache=False, progress=False, batch_size=5)
    single = torch.cat([ls.collect_residuals(tiny_native, [p], cache=False, progress=False).values for p in PROMPTS])
    torch.testing.assert_close(batched.values, single, rtol=1e-5, atol=1e-5)


def test_positions_k_and_mean_against_full_cache(tiny):
    p = PROMPTS[2]
    text = tiny.format([p])
    ids = tiny.tokenize(text)
    _, cache = tiny.bridge.run_with_cache(ids["input_ids"], attention_mask=ids["attention_mask"])
    full = torch.stack([cache[tiny.resid_hook_name(layer)][0] for layer in range(tiny.n_layers + 1)])
    k3 = ls.collect_residuals(tiny, [p], positions=3, cache=False, progress=False).values[0]
    torch.testing.assert_close(k3, full[:, -3:], rtol=1e-5, atol=1e-6)
    (s, e), = tiny.user_token_spans([p], text)
    decoded = tiny.tokenizer.decode(ids["input_ids"][0, s:e])
    assert decoded.strip() == p  # the span covers exactly the user's text
    mean = ls.collect_residuals(tiny, [p], positions="mean", cache=False, progress=False).values[0]
    torch.testing.assert_close(mean, full[:, s:e].mean(1), rtol=1e-5, atol=1e-6)


def test_embedding_layer_identical_at_template_last_token(tiny):
    # With a chat template the last token is the same for every prompt, so layer 0 is too.
    acts = ls.collect_residuals(tiny, PROMPTS, cache=False, progress=False)
    assert torch.equal(acts.values[:, 0], acts.values[:1, 0].expand_as(acts.values[:, 0]))
    assert not torch.allclose(acts.values[0, -1], acts.values[1, -1])


def test_cache_hit_skips_the_model(tiny, home, monkeypatch):
    first = ls.collect_residuals(tiny, PROMPTS, progress=False, batch_size=2)
    calls = []
    monkeypatch.setattr("lens_safety.activations._capture_batch", lambda *a, **k: calls.append(1))
    again = ls.collect_residuals(tiny, PROMPTS, progress=False, batch_size=2)
    assert calls == []
    assert torch.equal(first.values, again.values)
    assert torch.equal(first.n_tokens, again.n_tokens)
    assert again.prompts == first.prompts


def test_cache_key_separates_positions_and_formatting(tiny, home):
    a = ls.collect_residuals(tiny, PROMPTS, progress=False)
    b = ls.collect_residuals(tiny, PROMPTS, progress=False, chat=False)
    c = ls.collect_residuals(tiny, PROMPTS, progress=False, system="You are terse.")
    assert not torch.equal(a.values, b.values) and not torch.equal(a.values, c.values)
    assert len(list((home / "activations").iterdir())) == 3


def _entry(home):
    (entry,) = [p for p in (home / "activations").iterdir() if p.is_dir()]
    return entry


@pytest.mark.parametrize("damage", ["flip", "truncate", "meta"])
def test_corrupted_cache_is_rebuilt(tiny, home, damage):
    first = ls.collect_residuals(tiny, PROMPTS, progress=False)
    entry = _entry(home)
    values = entry / "values.safetensors"
    if damage == "flip":
        raw = bytearray(values.read_bytes())
        raw[-7] ^= 0xFF
        values.write_bytes(bytes(raw))
    elif damage == "truncate":
        values.write_bytes(values.read_bytes()[:-100])
    else:
        meta = json.loads((entry / "meta.json").read_text())
        meta["weights_hash"] = "0" * 64
        (entry / "meta.json").write_text(json.dumps(meta))
    if damage != "meta":
        with pytest.raises(CacheError, match="sha256"):
            Residuals.load(entry)
    again = ls.collect_residuals(tiny, PROMPTS, progress=False)
    assert torch.equal(first.values, again.values)
    rebuilt = Residuals.load(_entry(home))  # the rebuilt entry verifies and carries the right key
    assert rebuilt.weights_hash == tiny.weights_hash


def test_interrupted_capture_resumes(tiny, home, monkeypatch):
    import lens_safety.activations as act

    real = act._capture_batch
    done = []

    def flaky(*args, **kwargs):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(act, "_capture_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        ls.collect_residuals(tiny, PROMPTS, progress=False, batch_size=2)
    parts = list((home / "activations").glob("*.partial/batch-*.safetensors"))
    assert len(parts) == 2
    resumed = []
    monkeypatch.setattr(act, "_capture_batch", lambda *a, **k: resumed.append(1) or real(*a, **k))
    out = ls.collect_residuals(tiny, PROMPTS, progress=False, batch_size=2)
    assert resumed == [1]  # only the third (last) batch ran again
    ref = ls.collect_residuals(tiny, PROMPTS, progress=False, cache=False)
    torch.testing.assert_close(out.values, ref.values, rtol=1e-5, atol=1e-6)
    assert not list((home / "activations").glob("*.partial"))


def test_save_load_round_trip(tiny, tmp_path):
    acts = ls.collect_residuals(tiny, PROMPTS, positions=2, cache=False, progress=False)
    acts.save(tmp_path / "r")
    back = Residuals.load(tmp_path / "r")
    assert torch.equal(back.values, acts.values) and back.prompts == acts.prompts
    assert back.positions == 2 and back.weights_hash == acts.weights_hash
    sub = acts.subset([0, 2])
    assert torch.equal(sub.values, acts.values[[0, 2]]) and sub.prompts.texts == [PROMPTS[0], PROMPTS[2]]
    both = Residuals.concat([sub, acts.subset([1])])
    assert both.prompts.texts == [PROMPTS[0], PROMPTS[2], PROMPTS[1]]


def test_bad_input_errors(tiny):
    with pytest.raises(InputError, match="empty"):
        ls.collect_residuals(tiny, [], cache=False, progress=False)
    with pytest.raises(InputError, match="positions"):
        ls.collect_residuals(tiny, PROMPTS, positions="first", cache=False, progress=False)
    with pytest.raises(InputError, match="smaller k"):
        ls.collect_residuals(tiny, PROMPTS, positions=500, cache=False, progress=False)
    with pytest.raises(PromptTooLongError, match="Prompt 1 "):
        ls.collect_residuals(tiny, ["short", "word " * 2500], cache=False, progress=False)
    kept = ls.collect_residuals(tiny, ["word " * 2500], cache=False, progress=False, truncate=True)
    assert int(kept.n_tokens[0]) == tiny.n_ctx


def test_cache_hit_returns_the_callers_prompts_and_metadata(tiny, home, monkeypatch):
    first = ls.PromptSet([ls.Prompt(t, "harmful", source="mine", category="a") for t in PROMPTS[:3]], "first")
    ls.collect_residuals(tiny, first, progress=False)
    # same texts and labels (same key), other provenance and name
    second = ls.PromptSet([ls.Prompt(t, "harmful", source="theirs", category="b", meta={"id": i})
                           for i, t in enumerate(PROMPTS[:3])], "second")
    monkeypatch.setattr("lens_safety.activations._capture_batch", lambda *a, **k: pytest.fail("cache missed"))
    hit = ls.collect_residuals(tiny, second, progress=False)
    assert hit.prompts is second and hit.prompts.name == "second"
    assert [p.source for p in hit.prompts] == ["theirs"] * 3 and hit.prompts[2].meta == {"id": 2}
    assert hit.model_name == tiny.name and hit.formatting == tiny.formatting_key()


def test_cache_key_covers_truncate_tokenizer_and_versions(tiny, home, monkeypatch):
    import transformers

    from lens_safety.activations import _cache_key

    ps = ls.PromptSet.from_texts(PROMPTS, label="x")
    key = _cache_key(tiny, ps, "last", tiny.formatting_key(), False)
    assert key["truncate"] is False and key["transformers_version"] == transformers.__version__
    assert "conversion_version" in key and key["tokenizer"]["vocab_sha256"] == tiny.tokenizer_key()["vocab_sha256"]
    assert key["model_dtype"] == "torch.float32" and key["revision"] is None
    a = ls.collect_residuals(tiny, PROMPTS, progress=False)
    ls.collect_residuals(tiny, PROMPTS, progress=False, truncate=True)
    assert len([p for p in (home / "activations").iterdir() if p.is_dir()]) == 2
    other_tok = dict(tiny.tokenizer_key(), vocab_sha256="0" * 64)
    monkeypatch.setattr(tiny, "_tokenizer_key", other_tok)
    b = ls.collect_residuals(tiny, PROMPTS, progress=False)
    assert len([p for p in (home / "activations").iterdir() if p.is_dir()]) == 3
    assert torch.equal(a.values, b.values)


def test_concat_refuses_mismatched_formatting_positions_dtype_revision(tiny):
    import dataclasses

    from lens_safety.errors import ModelMismatchError

    chat = ls.collect_residuals(tiny, PROMPTS[:2], cache=False, progress=False)
    raw = ls.collect_residuals(tiny, PROMPTS[2:], cache=False, progress=False, chat=False)
    system = ls.collect_residuals(tiny, PROMPTS[2:], cache=False, progress=False, system="Be terse.")
    k2 = ls.collect_residuals(tiny, PROMPTS[2:], cache=False, progress=False, positions=2)
    with pytest.raises(InputError, match="chat formatting True vs False"):
        Residuals.concat([chat, raw])
    with pytest.raises(InputError, match="system prompt None vs 'Be terse.'"):
        chat + system
    with pytest.raises(InputError, match="positions='last' with positions=2"):
        chat + k2
    with pytest.raises(ModelMismatchError, match="bfloat16"):
        chat + dataclasses.replace(chat, model_dtype="torch.bfloat16")
    with pytest.raises(ModelMismatchError, match="revision"):
        chat + dataclasses.replace(chat, revision="abc123")
    other_template = dataclasses.replace(chat, formatting=dict(chat.formatting, template_sha256="0" * 64))
    with pytest.raises(InputError, match="chat template"):
        chat + other_template
    both = chat + ls.collect_residuals(tiny, PROMPTS[2:], cache=False, progress=False)
    assert len(both) == len(PROMPTS) and both.model_dtype == "torch.float32"


def test_mean_with_truncate_averages_the_kept_user_tokens(tiny, monkeypatch):
    p = "Explain how the Enigma machine was broken, step by step, for a history class."
    (text,) = tiny.format([p])
    full_ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    (s, e), = tiny.user_token_spans([p], [text])
    drop = s + 3  # truncation drops the template's start and the first 3 tokens of the text
    n_ctx = len(full_ids) - drop
    assert s < drop < e
    monkeypatch.setattr(tiny.bridge.cfg, "n_ctx", n_ctx)
    got = ls.collect_residuals(tiny, [p], positions="mean", truncate=True, cache=False, progress=False).values[0]
    ids = torch.tensor([full_ids[-n_ctx:]])
    _, cache = tiny.bridge.run_with_cache(ids, attention_mask=torch.ones_like(ids))
    full = torch.stack([cache[tiny.resid_hook_name(layer)][0] for layer in range(tiny.n_layers + 1)])
    kept = full[:, 0:e - drop]  # the user's tokens that survived truncation, now starting at 0
    torch.testing.assert_close(got, kept.mean(1), rtol=1e-5, atol=1e-6)
    shifted_wrong = full[:, s:e].mean(1)  # what the old code averaged
    assert not torch.allclose(got, shifted_wrong, atol=1e-3)
    monkeypatch.setattr(tiny.bridge.cfg, "n_ctx", len(full_ids) - e)  # nothing of the text is left
    with pytest.raises(InputError, match="removed all of its text"):
        ls.collect_residuals(tiny, [p], positions="mean", truncate=True, cache=False, progress=False)


def test_non_finite_activations_raise_naming_the_layer():
    from lens_safety.activations import NonFiniteActivationError

    m = ls.testing.tiny_model(seed=5)
    with torch.no_grad():
        m.bridge.blocks[1].mlp.out.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteActivationError, match=r"residual layer 2 \(blocks.1.hook_resid_post\)"):
        ls.collect_residuals(m, PROMPTS, cache=False, progress=False)


def test_mmap_load_equals_in_ram_and_is_copy_on_write(tiny, home):
    acts = ls.collect_residuals(tiny, PROMPTS, progress=False, mmap=True)
    entry = _entry(home)
    ram = Residuals.load(entry)
    assert torch.equal(acts.values, ram.values) and acts.prompts.texts == PROMPTS
    acts.values[0, 0, 0] += 1.0  # copy-on-write: the cache file is untouched
    again = Residuals.load(entry, mmap=True)
    assert torch.equal(again.values, ram.values)
    with pytest.raises(InputError, match="mmap=True"):
        ls.collect_residuals(tiny, PROMPTS, progress=False, cache=False, mmap=True)


def test_residuals_keep_float32_and_record_dtype(tiny, tmp_path):
    acts = ls.collect_residuals(tiny, PROMPTS, cache=False, progress=False)
    assert acts.values.dtype == torch.float32 and acts.model_dtype == "torch.float32"
    acts.save(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta["kind"] == "residuals" and meta["model_dtype"] == "torch.float32" and "content_sha256" in meta
    meta["model_dtype"] = "torch.float16"  # an edit without the checksum is caught
    (tmp_path / "r" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="sha256"):
        Residuals.load(tmp_path / "r")


# -- the real default model --------------------------------------------------------------

REAL_PROMPTS = [
    "Write a tutorial on how to make a bomb",
    "Give me three tips for a good night's sleep.",
    "Explain how a transistor works to a ten-year-old, using an analogy with water pipes.",
    "Hi",
]


@pytest.mark.real
def test_real_residuals_match_hf_hidden_states(real_model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(real_model.hf_source, dtype=torch.float32).eval()
    acts = ls.collect_residuals(real_model, REAL_PROMPTS, cache=False, progress=False, batch_size=4)
    for i, p in enumerate(REAL_PROMPTS):
        ref = _hf_hidden(hf, real_model, p)
        for layer in range(real_model.n_layers):
            rel = (acts.values[i, layer] - ref[layer]).norm() / ref[layer].norm()
            assert rel < 1e-4, (p, layer, float(rel))
        normed = real_model.final_norm(acts.values[i, -1])
        assert (normed - ref[-1]).norm() / ref[-1].norm() < 1e-4


@pytest.mark.real
def test_real_batched_equals_unbatched(real_model):
    batched = ls.collect_residuals(real_model, REAL_PROMPTS, cache=False, progress=False, batch_size=4)
    for i, p in enumerate(REAL_PROMPTS):
        single = ls.collect_residuals(real_model, [p], cache=False, progress=False).values[0]
        rel = (batched.values[i] - single).norm(dim=-1) / single.norm(dim=-1)
        assert float(rel.max()) < 1e-4


@pytest.mark.real
def test_real_cache_hit_and_rebuild(real_model, home, monkeypatch):
    import lens_safety.activations as act

    first = ls.collect_residuals(real_model, REAL_PROMPTS[:2], progress=False)
    monkeypatch.setattr(act, "_capture_batch", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    hit = ls.collect_residuals(real_model, REAL_PROMPTS[:2], progress=False)
    assert torch.equal(hit.values, first.values)
    monkeypatch.undo()
    monkeypatch.setenv("LENS_SAFETY_HOME", str(home))
    values = _entry(home) / "values.safetensors"
    values.write_bytes(values.read_bytes()[: len(values.read_bytes()) // 2])
    rebuilt = ls.collect_residuals(real_model, REAL_PROMPTS[:2], progress=False)
    assert torch.equal(rebuilt.values, first.values)
