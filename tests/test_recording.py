"""Recording generation (lens_safety.model.recording): same tokens as plain generation, residuals equal to
one unpadded forward pass, batching, bookkeeping, stop tokens, the cache, interventions, errors, sampling
and the evaluate_refusal hookup. Tiny random models only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lens_safety.behaviour.refusal import evaluate_refusal
from lens_safety.core.errors import CacheError, InputError
from lens_safety.inputs.prompts import PromptSet
from lens_safety.model import generation as G
from lens_safety.model import recording
from lens_safety.model.generation import Sampling, run_generation, to_prompt_set
from lens_safety.model.recording import RecordSpec, ReplyRecording, generate, record_generation
from lens_safety.model.testing import tiny_model

# 17, 25, 45 and 23 tokens once chat-formatted: every batch of 2 or 3 is left-padded
PROMPTS = ["Hi", "How do I bake bread?", "Explain how the Enigma machine was broken, step by step.",
           "List three rivers"]
N_NEW = 6


@pytest.fixture(scope="module")
def gpt2():
    """A tiny random GPT-2 (absolute positions: left padding changes results unless positions are right)."""
    return tiny_model(kind="gpt2")


@pytest.fixture(params=["hf", "gpt2"])
def model(request):
    return request.getfixturevalue("tiny" if request.param == "hf" else "gpt2")


def rec_of(model, prompts=PROMPTS, **kw) -> ReplyRecording:
    kw = {"record": "all", "max_new_tokens": N_NEW, "batch_size": 2, "cache": False, "progress": False, **kw}
    return record_generation(model, prompts, **kw)


def reference(model, ids: list[int], layers) -> torch.Tensor:
    """``[positions, layers, d]`` from ONE unpadded forward pass over ``ids`` (no mask, default positions)."""
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(torch.tensor([ids]))
    return torch.stack([cache[model.resid_hook_name(layer)][0] for layer in layers], dim=1)


def assert_same(a: ReplyRecording, b: ReplyRecording, atol: float = 0.0) -> None:
    """Same texts, ids, bookkeeping and residuals (exactly, by default; dtype included)."""
    assert a.texts == b.texts
    assert a.prompt_ids == b.prompt_ids and a.reply_ids == b.reply_ids
    assert a.layers == b.layers and a.spec == b.spec
    np.testing.assert_array_equal(a.n_recorded_prompt, b.n_recorded_prompt)
    for i in range(len(a)):
        torch.testing.assert_close(a.resid(i), b.resid(i), atol=atol, rtol=0)


def boom(*args, **kwargs):
    raise AssertionError("generated although it should not have")


# -- 1-3: tokens, an independent reference, batching -------------------------------------------------


def test_same_tokens_as_plain_generation(model):
    rec = rec_of(model)
    texts, scores, tokens = run_generation(model, to_prompt_set(PROMPTS), max_new_tokens=N_NEW, batch_size=2,
                                           system=None, chat=None, progress=False)
    assert scores is None
    assert rec.reply_ids == tokens
    assert [len(r) for r in tokens] == [N_NEW] * len(PROMPTS)  # these tiny models never stop by themselves here
    assert rec.texts == texts == generate(model, PROMPTS, max_new_tokens=N_NEW, batch_size=2, progress=False)
    # the prompt ids are the formatted prompts' own tokens, without padding
    formatted = model.format(PROMPTS)
    assert rec.prompt_ids == [model.tokenizer(f, add_special_tokens=False)["input_ids"] for f in formatted]
    assert rec.n_prompt_tokens.tolist() == [17, 25, 45, 23]
    # generate(record=...) is the same recording, kept in memory
    assert_same(rec, generate(model, PROMPTS, max_new_tokens=N_NEW, batch_size=2, progress=False, record="all"))


def test_residuals_equal_one_unpadded_forward_pass(model):
    rec = rec_of(model)
    layers = list(range(model.n_layers + 1))
    assert rec.layers == tuple(layers)
    for i in range(len(PROMPTS)):
        ref = reference(model, rec.prompt_ids[i] + rec.reply_ids[i], layers)
        assert rec.resid(i).shape == ref.shape == (rec.n_prompt_tokens[i] + N_NEW, model.n_layers + 1, model.d_model)
        torch.testing.assert_close(rec.resid(i), ref, atol=1e-5, rtol=0)
        assert rec.resid(i).dtype == torch.float32


def test_without_kv_cache_the_newest_position_is_recorded(tiny_native, monkeypatch):
    widths = []
    real = G.forward_logits

    def spy(bridge, ids, *args, **kwargs):
        widths.append(ids.shape[1])
        return real(bridge, ids, *args, **kwargs)

    monkeypatch.setattr(G, "forward_logits", spy)
    rec = rec_of(tiny_native, max_new_tokens=3, batch_size=4)
    assert widths == [45, 46, 47, 48]  # boot_native has no KV cache: every pass recomputes the sequence
    _, _, tokens = run_generation(tiny_native, to_prompt_set(PROMPTS), max_new_tokens=3, batch_size=4,
                                  system=None, chat=None, progress=False)
    assert rec.reply_ids == tokens
    for i in range(len(PROMPTS)):
        ids = rec.prompt_ids[i] + rec.reply_ids[i]
        ref = reference(tiny_native, ids, range(tiny_native.n_layers + 1))
        torch.testing.assert_close(rec.resid(i), ref, atol=1e-5, rtol=0)


def test_batched_equals_unbatched(model):
    one = rec_of(model, batch_size=1)
    three = rec_of(model, batch_size=3)
    assert one.texts == three.texts and one.reply_ids == three.reply_ids
    assert_same(one, three, atol=1e-5)


# -- 4: shapes and bookkeeping ---------------------------------------------------------------------------


def test_shapes_steps_tokens_and_layer_access(tiny):
    rec = rec_of(tiny)
    for i in range(len(PROMPTS)):
        n, k = int(rec.n_recorded_prompt[i]), len(rec.reply_ids[i])
        assert n == rec.n_prompt_tokens[i] == len(rec.prompt_ids[i])
        assert rec.resid(i).shape == (n + k, tiny.n_layers + 1, tiny.d_model)
        steps = rec.steps(i)
        np.testing.assert_array_equal(steps, np.arange(1 - n, k + 1))
        assert len(steps) == rec.resid(i).shape[0] and steps[n - 1] == 0 and steps[-1] == k
        torch.testing.assert_close(rec.resid(i, layer=2), rec.resid(i)[:, 2], atol=0, rtol=0)
        torch.testing.assert_close(rec.reply_resid(i), rec.resid(i)[n:], atol=0, rtol=0)
        assert rec.reply_resid(i, layer=3).shape == (k, tiny.d_model)
        assert rec.tokens(i) == [tiny.tokenizer.decode([t]) for t in rec.prompt_ids[i] + rec.reply_ids[i]]
    assert rec.resid(-1).shape == rec.resid(3).shape
    with pytest.raises(InputError, match="out of range"):
        rec.resid(4)
    with pytest.raises(InputError, match="out of range"):
        rec.resid(-5)
    np.testing.assert_array_equal(rec.n_reply_tokens, [N_NEW] * 4)
    assert "n=4" in repr(rec) and f"reply_tokens={4 * N_NEW}" in repr(rec)


def test_last_k_prompt_positions_and_dtype(tiny):
    full = rec_of(tiny)
    last2 = rec_of(tiny, record=RecordSpec(layers=(3, 1), prompt_positions=2))
    assert last2.layers == (1, 3)
    assert last2.reply_ids == full.reply_ids
    np.testing.assert_array_equal(last2.n_recorded_prompt, [2, 2, 2, 2])
    for i in range(len(PROMPTS)):
        n = int(full.n_recorded_prompt[i])
        assert last2.resid(i).shape == (2 + N_NEW, 2, tiny.d_model)
        torch.testing.assert_close(last2.resid(i), full.resid(i)[n - 2:, [1, 3]], atol=1e-6, rtol=0)
        np.testing.assert_array_equal(last2.steps(i), np.arange(-1, N_NEW + 1))
        assert last2.tokens(i) == full.tokens(i)[n - 2:]
    with pytest.raises(InputError, match="not recorded"):
        last2.resid(0, layer=2)
    # more positions than the shortest prompt has (17 tokens): that row keeps its 17, never padding
    wide = rec_of(tiny, record=RecordSpec(layers=(0,), prompt_positions=20))
    np.testing.assert_array_equal(wide.n_recorded_prompt, [17, 20, 20, 20])
    for i in range(len(PROMPTS)):
        n, k = int(full.n_recorded_prompt[i]), int(wide.n_recorded_prompt[i])
        torch.testing.assert_close(wide.resid(i), full.resid(i)[n - k:, [0]], atol=1e-6, rtol=0)
    half = rec_of(tiny, record=RecordSpec(layers=(2,), dtype="float16"))
    for i in range(len(PROMPTS)):
        assert half.resid(i).dtype == torch.float16
        torch.testing.assert_close(half.resid(i)[:, 0], full.resid(i, 2).half(), atol=1e-3, rtol=1e-3)
    assert rec_of(tiny, record=RecordSpec(layers=(2,), dtype="bfloat16")).resid(0).dtype == torch.bfloat16


def test_frames(tiny):
    ps = PromptSet.from_texts(PROMPTS, label="harmless")
    rec = rec_of(tiny, ps, record=RecordSpec(layers=(1,), prompt_positions=3))
    frame = rec.to_frame()
    assert list(frame.columns) == ["prompt", "label", "method", "request", "completion", "n_prompt_tokens",
                                   "n_recorded_prompt", "n_reply_tokens"]
    assert len(frame) == 4 and frame["prompt"].tolist() == [0, 1, 2, 3]
    assert frame["label"].tolist() == ["harmless"] * 4 and frame["request"].tolist() == PROMPTS
    assert frame["completion"].tolist() == rec.texts
    assert frame["n_prompt_tokens"].tolist() == [17, 25, 45, 23]
    assert frame["n_recorded_prompt"].tolist() == [3] * 4 and frame["n_reply_tokens"].tolist() == [N_NEW] * 4
    tf = rec.token_frame()
    assert list(tf.columns) == ["prompt", "step", "token_id", "token"]
    assert len(tf) == 4 * (3 + N_NEW)
    for i in range(4):
        part = tf[tf["prompt"] == i]
        assert part["step"].tolist() == rec.steps(i).tolist()
        assert part["token_id"].tolist() == rec.prompt_ids[i][-3:] + rec.reply_ids[i]
        assert part["token"].tolist() == rec.tokens(i)
    sub = rec.token_frame([2])
    assert len(sub) == 3 + N_NEW and set(sub["prompt"]) == {2}


# -- 5: stop tokens and max_new_tokens -----------------------------------------------------------------


def _cut(reply: list[int], stop: int) -> list[int]:
    return reply[:reply.index(stop)] if stop in reply else reply


def test_stopped_and_full_replies_record_their_last_position(tiny, monkeypatch):
    free = rec_of(tiny, record=[0, 3])
    # a token that ends some replies early (not at their first token) and is absent from others
    stop = min(t for r in free.reply_ids for t in r[1:]
               if all(t != r[0] for r in free.reply_ids) and not all(t in r for r in free.reply_ids))
    monkeypatch.setattr(G, "stop_ids", lambda model: [stop])
    rec = rec_of(tiny, record=[0, 3])
    expected = [_cut(r, stop) for r in free.reply_ids]
    assert rec.reply_ids == expected
    lengths = [len(r) for r in expected]
    assert min(lengths) >= 1 and min(lengths) < N_NEW and max(lengths) == N_NEW  # both kinds of row
    assert rec.texts == generate(tiny, PROMPTS, max_new_tokens=N_NEW, batch_size=2, progress=False)
    for i in range(len(PROMPTS)):
        ids = rec.prompt_ids[i] + expected[i]
        assert rec.resid(i).shape[0] == len(ids) and rec.steps(i)[-1] == lengths[i]
        torch.testing.assert_close(rec.resid(i), reference(tiny, ids, [0, 3]), atol=1e-5, rtol=0)
        # the stop token is not recorded, and the kept positions are those of the free run
        torch.testing.assert_close(rec.resid(i), free.resid(i)[:len(ids)], atol=1e-5, rtol=0)


def test_stop_at_first_token_leaves_only_the_prompt(tiny, monkeypatch):
    free = rec_of(tiny, record=[2], batch_size=1)
    stop = free.reply_ids[0][0]
    monkeypatch.setattr(G, "stop_ids", lambda model: [stop])
    rec = rec_of(tiny, record=[2], batch_size=1)
    assert rec.reply_ids[0] == [] and rec.texts[0] == ""
    assert rec.reply_ids == [_cut(r, stop) for r in free.reply_ids]
    n = len(rec.prompt_ids[0])
    assert rec.resid(0).shape == (n, 1, tiny.d_model) and rec.reply_resid(0).shape[0] == 0
    assert rec.steps(0)[-1] == 0 and len(rec.steps(0)) == n
    torch.testing.assert_close(rec.resid(0), reference(tiny, rec.prompt_ids[0], [2]), atol=1e-5, rtol=0)
    assert len(rec.token_frame([0])) == n


def test_one_new_token_is_recorded_by_the_final_pass(model):
    free = rec_of(model, record=[1, 2])
    rec = rec_of(model, record=[1, 2], max_new_tokens=1)
    assert rec.reply_ids == [r[:1] for r in free.reply_ids]
    for i in range(len(PROMPTS)):
        ids = rec.prompt_ids[i] + rec.reply_ids[i]
        assert rec.resid(i).shape[0] == len(ids)
        torch.testing.assert_close(rec.resid(i), reference(model, ids, [1, 2]), atol=1e-5, rtol=0)


# -- 6: the cache ----------------------------------------------------------------------------------------


def test_cache_round_trip_loads_without_generating(tiny, tmp_path, monkeypatch):
    mem = rec_of(tiny, record=[0, 2])
    first = rec_of(tiny, record=[0, 2], cache=tmp_path)
    assert_same(mem, first)
    entries = list(tmp_path.iterdir())
    assert len(entries) == 1 and first.folder == entries[0] and not entries[0].name.endswith(".partial")
    assert sorted(p.name for p in first.folder.glob("batch_*")) == ["batch_00000.safetensors",
                                                                     "batch_00001.safetensors"]
    assert not (first.folder / "key.json").exists()
    monkeypatch.setattr(recording, "run_generation", boom)
    monkeypatch.setattr(G, "_greedy_batch", boom)
    second = rec_of(tiny, record=[0, 2], cache=tmp_path)
    assert_same(first, second)
    assert second.info["key"] == first.info["key"] and second.info["model_name"] == tiny.name
    # other decoding arguments are another key: they would generate
    with pytest.raises(AssertionError, match="generated"):
        rec_of(tiny, record=[0, 2], cache=tmp_path, max_new_tokens=N_NEW - 1)
    with pytest.raises(AssertionError, match="generated"):
        rec_of(tiny, record=[0, 1], cache=tmp_path)


def test_save_and_load(tiny, tmp_path):
    rec = rec_of(tiny, PromptSet.from_texts(PROMPTS, label="harmful"),
                 record=RecordSpec((1, 3), prompt_positions=4, dtype="bfloat16"))
    path = rec.save(tmp_path / "saved")
    assert path == tmp_path / "saved"
    back = ReplyRecording.load(path, tokenizer=tiny.tokenizer)
    assert_same(rec, back)
    assert back.resid(0).dtype == torch.bfloat16
    assert back.prompts.texts == PROMPTS and back.prompts.labels == ["harmful"] * 4
    assert back.info == rec.info and back.tokens(1) == rec.tokens(1)
    assert back.to_frame().equals(rec.to_frame())
    # a folder-backed recording saves too
    again = ReplyRecording.load(back.save(tmp_path / "copy"))
    assert_same(rec, again)
    assert again.tokens(0) == [str(t) for t in rec.prompt_ids[0][-4:] + rec.reply_ids[0]]  # no tokenizer: ids
    with pytest.raises(CacheError):
        ReplyRecording.load(tmp_path / "nowhere")
    meta = path / "meta.json"
    meta.write_text(meta.read_text().replace('"harmful"', '"harmless"'))
    with pytest.raises(CacheError):
        ReplyRecording.load(path)


def test_corrupted_shard_is_detected_and_rebuilt(tiny, tmp_path, monkeypatch):
    mem = rec_of(tiny, record=[1])
    entry = rec_of(tiny, record=[1], cache=tmp_path).folder
    shard = entry / "batch_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0xFF  # a byte of tensor data: still a readable file, but not the recorded one
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="sha256"):
        ReplyRecording.load(entry)
    calls = []
    real = recording.run_generation
    monkeypatch.setattr(recording, "run_generation", lambda *a, **k: calls.append(1) or real(*a, **k))
    rebuilt = rec_of(tiny, record=[1], cache=tmp_path)
    assert calls == [1]
    assert_same(mem, rebuilt)
    assert_same(mem, ReplyRecording.load(entry))
    # a missing shard is detected too
    (entry / "batch_00000.safetensors").unlink()
    with pytest.raises(CacheError):
        ReplyRecording.load(entry)
    assert_same(mem, rec_of(tiny, record=[1], cache=tmp_path))
    assert calls == [1, 1]


def test_interrupted_recording_resumes_from_finished_batches(tiny, tmp_path, monkeypatch):
    prompts = PROMPTS[:3]  # longest first: batch 0 = prompts 2 and 1, batch 1 = prompt 0
    full = rec_of(tiny, prompts, record=[2])
    real_end = recording._Recorder.end
    ends = []

    def failing_end(self, *args, **kwargs):
        ends.append(1)
        if len(ends) == 2:
            raise RuntimeError("interrupted")
        return real_end(self, *args, **kwargs)

    monkeypatch.setattr(recording._Recorder, "end", failing_end)
    with pytest.raises(RuntimeError, match="interrupted"):
        rec_of(tiny, prompts, record=[2], cache=tmp_path)
    (partial,) = list(tmp_path.iterdir())
    assert partial.name.endswith(".partial")
    assert (partial / "batch_00000.safetensors").exists() and not (partial / "batch_00001.safetensors").exists()
    monkeypatch.setattr(recording._Recorder, "end", real_end)
    rows = []
    real_batch = G._greedy_batch

    def counting(model, ids, *args, **kwargs):
        rows.append(ids.shape[0])
        return real_batch(model, ids, *args, **kwargs)

    monkeypatch.setattr(G, "_greedy_batch", counting)
    resumed = rec_of(tiny, prompts, record=[2], cache=tmp_path)
    assert rows == [1]  # only the unfinished batch (one prompt) ran
    assert_same(full, resumed)
    assert [p.name for p in tmp_path.iterdir()] == [resumed.folder.name]
    assert not resumed.folder.name.endswith(".partial")


# -- 7: interventions ------------------------------------------------------------------------------------


def test_recording_sees_the_intervention(tiny, tmp_path, home, monkeypatch):
    vec = torch.linspace(-1.0, 1.0, tiny.d_model)
    name = tiny.resid_hook_name(1)

    def add(t, hook):
        return t + vec

    plain = rec_of(tiny, record=[1, 2])
    hooked = rec_of(tiny, record=[1, 2], fwd_hooks=[(name, add)])
    assert_same(hooked, generate(tiny, PROMPTS, max_new_tokens=N_NEW, batch_size=2, progress=False,
                                 fwd_hooks=[(name, add)], record=[1, 2]))
    for i in range(len(PROMPTS)):
        ids = hooked.prompt_ids[i] + hooked.reply_ids[i]
        # layer 1 is the hooked point: the recording holds the edited stream, at every position
        torch.testing.assert_close(hooked.resid(i, 1), reference(tiny, ids, [1])[:, 0] + vec, atol=1e-5, rtol=0)
        # where both runs read the same tokens, hooked = unhooked + vec
        common = next((k for k, (a, b) in enumerate(zip(plain.reply_ids[i], hooked.reply_ids[i])) if a != b),
                      min(len(plain.reply_ids[i]), len(hooked.reply_ids[i])))
        upto = int(plain.n_recorded_prompt[i]) + common
        torch.testing.assert_close(hooked.resid(i, 1)[:upto], plain.resid(i, 1)[:upto] + vec, atol=1e-5, rtol=0)
        # layer 2 (downstream) equals a hooked forward pass
        with tiny.bridge.hooks(fwd_hooks=[(name, add)]):
            ref2 = reference(tiny, ids, [2])[:, 0]
        torch.testing.assert_close(hooked.resid(i, 2), ref2, atol=1e-5, rtol=0)
        assert (hooked.resid(i, 2)[:upto] - plain.resid(i, 2)[:upto]).abs().max() > 1e-2
    # a folder of one's own caches the intervention; the hook names are part of the key
    cached = rec_of(tiny, record=[1, 2], fwd_hooks=[(name, add)], cache=tmp_path)
    assert_same(hooked, cached)
    assert_same(plain, rec_of(tiny, record=[1, 2], cache=tmp_path))
    assert len(list(tmp_path.iterdir())) == 2
    monkeypatch.setattr(G, "_greedy_batch", boom)
    with pytest.raises(InputError, match="cache"):
        rec_of(tiny, record=[1, 2], fwd_hooks=[(name, add)], cache=True)
    assert not (home / "replies").exists()


# -- 8: errors before any forward pass -------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"record": [4]}, r"outside .*0\.\.3"),
    ({"record": [0, 99]}, r"\[99\]"),
    ({"record": RecordSpec((7,))}, r"\[7\]"),
    ({"record": -1}, ">= 0"),
    ({"record": []}, "at least one layer"),
    ({"record": "everything"}, "a list of layers"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"batch_size": 0}, "batch_size"),
    ({"sampling": "x"}, "Sampling"),
    ({"sampling": 0.7}, "Sampling"),
    ({"prompts": []}, "empty"),
])
def test_clear_errors_before_any_forward_pass(tiny, tmp_path, monkeypatch, kwargs, match):
    monkeypatch.setattr(G, "_greedy_batch", boom)
    monkeypatch.setattr(recording, "run_generation", boom)
    kwargs = {"prompts": PROMPTS, **kwargs}
    with pytest.raises(InputError, match=match):
        rec_of(tiny, kwargs.pop("prompts"), cache=tmp_path / "c", **kwargs)
    assert not (tmp_path / "c").exists()


def test_bad_specs():
    with pytest.raises(InputError, match="dtype"):
        RecordSpec((1,), dtype="float64")
    with pytest.raises(InputError, match="prompt_positions"):
        RecordSpec((1,), prompt_positions=0)
    with pytest.raises(InputError, match="prompt_positions"):
        RecordSpec((1,), prompt_positions="last")
    assert RecordSpec(2).layers == (2,) and RecordSpec((3, 1, 3)).layers == (1, 3)
    assert RecordSpec((1,)).to_dict() == {"layers": [1], "prompt_positions": "all", "dtype": "float32"}


# -- 9: sampling -----------------------------------------------------------------------------------------


def test_sampling_is_seeded_and_batch_independent(tiny):
    s = Sampling(temperature=1.0, seed=1)
    one = rec_of(tiny, record=[2], sampling=s, batch_size=1)
    three = rec_of(tiny, record=[2], sampling=s, batch_size=3)
    assert one.reply_ids == three.reply_ids
    assert_same(one, three, atol=1e-5)
    assert rec_of(tiny, record=[2], sampling=s, batch_size=3).reply_ids == three.reply_ids
    # recording (and its final pass) does not change the sampled tokens
    assert generate(tiny, PROMPTS, max_new_tokens=N_NEW, batch_size=2, progress=False, sampling=s) == one.texts
    other = rec_of(tiny, record=[2], sampling=Sampling(temperature=1.0, seed=2))
    assert any(a != b for a, b in zip(other.reply_ids, one.reply_ids))
    greedy = rec_of(tiny, record=[2])
    assert any(a != b for a, b in zip(greedy.reply_ids, one.reply_ids))
    for i in range(len(PROMPTS)):
        ref = reference(tiny, one.prompt_ids[i] + one.reply_ids[i], [2])
        torch.testing.assert_close(one.resid(i), ref, atol=1e-5, rtol=0)
    # a nucleus this small keeps only the top token: greedy
    assert rec_of(tiny, record=[2], sampling=Sampling(temperature=1.0, top_p=1e-6, seed=5)).reply_ids == \
        greedy.reply_ids


@pytest.mark.parametrize("kwargs", [{"temperature": 0}, {"temperature": -0.5}, {"top_p": 0},
                                    {"top_p": -0.1}, {"top_p": 1.01}])
def test_bad_sampling(kwargs):
    with pytest.raises(InputError):
        Sampling(**kwargs)


# -- 10: evaluate_refusal --------------------------------------------------------------------------------


def test_evaluate_refusal_records_and_reuses_its_cache(tiny, tmp_path, monkeypatch):
    kw = {"max_new_tokens": N_NEW, "batch_size": 2, "progress": False}
    res = evaluate_refusal(tiny, PROMPTS, cache=tmp_path, record=[1, 3], **kw)
    rec = res.recording
    assert isinstance(rec, ReplyRecording) and rec.layers == (1, 3)
    assert rec.folder.parent == tmp_path / "replies"
    assert rec.texts == res.completions
    np.testing.assert_allclose(rec.scores, res.score, rtol=1e-6, atol=1e-6)
    # the replies and scores are those of a run that does not record
    plain = evaluate_refusal(tiny, PROMPTS, cache=False, **kw)
    assert plain.recording is None and plain.completions == res.completions
    np.testing.assert_allclose(plain.score, res.score, rtol=1e-5, atol=1e-5)
    assert_same(rec, rec_of(tiny, record=[1, 3]))
    monkeypatch.setattr(recording, "run_generation", boom)
    monkeypatch.setattr(G, "_greedy_batch", boom)
    again = evaluate_refusal(tiny, PROMPTS, cache=tmp_path, record=[1, 3], **kw)
    assert isinstance(again.recording, ReplyRecording)
    assert again.completions == res.completions and again.recording.texts == res.completions
    np.testing.assert_allclose(again.recording.scores, res.score, rtol=1e-6, atol=1e-6)
    assert_same(rec, again.recording)


# -- odd inputs ------------------------------------------------------------------------------------------


def test_numpy_integer_layer_is_accepted(tiny):
    rec = rec_of(tiny, record=np.int64(2), max_new_tokens=1)
    assert rec.layers == (2,)


@pytest.mark.parametrize("record", [None, 1.5, "some"])
def test_record_none_or_junk_is_an_input_error(tiny, record):
    with pytest.raises(InputError):
        rec_of(tiny, record=record)


def test_max_new_tokens_none_is_refused_before_a_forward(tiny, monkeypatch):
    import lens_safety.model.generation as G

    monkeypatch.setattr(G, "_greedy_batch", lambda *a, **k: pytest.fail("forward ran"))
    with pytest.raises(InputError):
        recording.generate(tiny, ["Hi"], max_new_tokens=None, progress=False)
    with pytest.raises(InputError):
        rec_of(tiny, max_new_tokens=None)


def test_recording_sees_the_direction_interventions(tiny):
    """ls.ablate: no recorded residual (layers 1..n, every prompt and reply position) keeps a component along
    the direction; ls.add at layer 2: the recorded layer 2 is the unedited stream plus the vector where the
    two runs still share their tokens."""
    from lens_safety.analyses.directions import RefusalDirection, ablate, add

    g = torch.Generator().manual_seed(0)
    d = RefusalDirection(torch.randn(tiny.d_model, generator=g), 2, -1, tiny.name, tiny.weights_hash, tiny.n_layers)
    unit = d.unit
    plain = rec_of(tiny)
    ablated = rec_of(tiny, fwd_hooks=list(ablate(d)))
    for i in range(len(PROMPTS)):
        proj = ablated.resid(i)[:, 1:] @ unit
        assert proj.abs().max() < 1e-4 * ablated.resid(i).abs().max()
        assert (plain.resid(i)[:, 1:] @ unit).abs().max() > 1e-2
    added = rec_of(tiny, fwd_hooks=list(add(d, layer=2, coeff=3.0)))
    for i in range(len(PROMPTS)):
        a, b = added.reply_ids[i], plain.reply_ids[i]
        common = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        n = added.n_recorded_prompt[i] + common  # positions whose inputs the two runs share
        torch.testing.assert_close(added.resid(i, 2)[:n], plain.resid(i, 2)[:n] + 3.0 * d.vector, atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(added.resid(i, 1)[:n], plain.resid(i, 1)[:n])


def test_a_recording_without_scores_is_not_reused_where_scores_are_needed(tiny, tmp_path):
    """The score function is part of the cache key: a recording cached without first-pass scores (or with
    other ones) is not handed to evaluate_refusal, whose scores must be the RefusalTokens ones."""
    plain = rec_of(tiny, record=[1], cache=tmp_path / "replies")
    assert plain.scores is None
    res = evaluate_refusal(tiny, PROMPTS, max_new_tokens=N_NEW, batch_size=2, cache=tmp_path, progress=False,
                           record=[1])
    assert res.recording.scores is not None and res.recording.reply_ids == plain.reply_ids
    np.testing.assert_allclose(res.recording.scores, res.score, rtol=1e-6)
    other = rec_of(tiny, record=[1], cache=tmp_path / "replies", score_first=lambda lg: lg[:, 0])
    assert np.isfinite(other.scores).all() and not np.allclose(other.scores, res.score)  # its own scores
    assert len([p for p in (tmp_path / "replies").iterdir() if p.is_dir()]) == 3
