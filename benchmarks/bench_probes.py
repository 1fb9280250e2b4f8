"""Probes: speed of probe_layers, and the science of claims 1 and 3 on a real model.

Run: ``python benchmarks/bench_probes.py [--n 600] [--n-jobs 1]``. Prints one JSON row per
configuration. Synthetic data has the default model's shape (24 blocks + embedding, 896) with a
class signal that grows with depth. Target: the linear probes under 30 s on 2 cores (with
controls: one shuffled-label run per layer and a 20-permutation test at the best layer).

``--real [--model NAME] [--no-chat] [--out DIR] [--n-per 200] [--jailbreaks prefix_injection,few_shot]
[--n-jailbreak 48] [--borderline]`` measures on a real model (the script takes ``/tmp/lens_safety_model.lock``
itself, only while capturing). Rows, in order:

1. ``"claim": 1`` — claim 1 on both harmless sets side by side: harmbench (200) vs 200 of the
   topic-matched ``harmless`` set, and vs 200 of the paper-style ``generic`` set; SVM, 5-fold CV,
   controls, and :func:`lens_safety.probes.claim1_verdict` (threshold 0.95, early = layers 1–6).
2. ``"transfer": "jailbreak:<method>"`` — the transfer probe (harmful vs harmless, 200 + 200) applied
   to jailbroken versions of 48 harmbench requests: the leaky rate (trained on every request) next
   to the leak-free one (cross-fit by request), per layer.
3. per classifier, harmbench vs the same 200 matched harmless prompts (timed); with ``--borderline``
   the borderline set's fraction classified harmful; the 3-way task (grouped by request, with its
   length control).

Residuals are cached per set (``$LENS_SAFETY_HOME/activations``), so reruns skip the model forward.
``--out DIR`` writes the claim-1 figure and verdict table, CSV frames and the saved SVM probes.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

import lens_safety as ls
from lens_safety.prompts import PromptSet


def synthetic(n: int = 600, n_layers: int = 24, d: int = 896, seed: int = 0) -> ls.Residuals:
    g = torch.Generator().manual_seed(seed)
    half = n // 2
    ps = (PromptSet.from_texts([f"harmful {i}" for i in range(half)], label="harmful")
          + PromptSet.from_texts([f"harmless {i}" for i in range(n - half)], label="harmless"))
    v = torch.randn(n, n_layers + 1, d, generator=g)
    signal = torch.randn(d, generator=g)
    signal /= signal.norm()
    strength = torch.linspace(0, 6, n_layers + 1)
    v[:half] += strength[None, :, None] * signal
    return ls.Residuals(v, ps, torch.randint(20, 60, (n,), generator=g), "synthetic", "synthetic", "last")


def bench(res: ls.Residuals, classifier: str, n_jobs: int | None, controls: bool, data: str) -> dict:
    t0 = time.perf_counter()
    r = ls.probe_layers(res, classifier=classifier, cv=5, controls=controls, n_jobs=n_jobs, progress=False)
    dt = time.perf_counter() - t0
    return {"bench": "probe_layers", "data": data, "classifier": classifier, "n": len(res),
            "layers": len(r.layers), "d_model": res.d_model, "folds": 5, "controls": controls,
            "n_jobs": n_jobs, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "seconds": round(dt, 2), "best_accuracy": round(float(np.max(r.metrics["accuracy"])), 4)}


def _curve(values) -> list[float]:
    return [round(float(x), 3) for x in values]


def _capture_all(model_name: str | None, chat: bool | None, methods: list[str], n_jailbreak: int, n_per: int,
                 borderline: bool):
    """Load the model and capture (or read from the cache) every residual set, one cache entry per
    set (``n_per`` prompts of each, ``PromptSet.sample(n_per, seed=0)``), holding the shared model
    lock (``/tmp/lens_safety_model.lock``) only for this part."""
    import fcntl

    with open("/tmp/lens_safety_model.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        model = ls.load_model(model_name)
        harmful = ls.load_prompts("harmbench")
        t0 = time.perf_counter()
        names = ("harmbench", "harmless", "generic") + (("borderline",) if borderline else ())
        sets = {name: ls.collect_residuals(model, _sample_set(name, n_per), chat=chat, batch_size=8,
                                           progress=False) for name in names}
        capture_s = time.perf_counter() - t0
        jbs = {m: ls.collect_residuals(model, ls.jailbreak(harmful.sample(n_jailbreak, seed=0), m), chat=chat,
                                       batch_size=8, progress=False) for m in methods}
        info = {"model": model.name, "chat": model.formatting_key(chat=chat)["chat"], "n_layers": model.n_layers}
        del model
    return sets, jbs, info, capture_s


def _sample_set(name: str, n: int) -> PromptSet:
    ps = ls.load_prompts(name)
    return ps.sample(n, seed=0) if n < len(ps) else ps


def _la(x) -> dict | None:
    return None if x is None else {k: (round(v, 4) if isinstance(v, float) else v) for k, v in x._asdict().items()}


def claim1(sets: dict, info: dict, n_per: int, n_jobs: int | None, out_dir=None) -> dict:
    """Claim 1 on both harmless sets side by side: harmbench vs ``n_per`` of each (SVM, 5-fold, controls)."""
    from lens_safety.probes import claim1_verdict

    verdicts = {}
    for name in ("harmless", "generic"):
        two = ls.Residuals.concat([sets[name], sets["harmbench"]])
        t0 = time.perf_counter()
        r = ls.probe_layers(two, classifier="svm", cv=5, n_jobs=n_jobs, progress=False, task=f"harmbench-vs-{name}")
        dt = time.perf_counter() - t0
        v = claim1_verdict(r, threshold=0.95, name=f"harmbench vs {name}")
        verdicts[name] = v
        m = r.metrics
        best = r._row(r.best_layer().layer)
        print(json.dumps({
            "claim": 1, "harmless_set": name, **info, "classifier": "svm", "n": r.n, "folds": r.cv,
            "seconds": round(dt, 1), "verdict": v.verdict, "early": v.early, "reason": v.reason,
            "first_layer_ge_0.95": _la(v.first), "early_best": _la(v.early_best), "best": _la(v.best),
            "auroc_best": round(float(m["auroc"][best]), 4),
            "permutation_pvalue_best": round(float(m["permutation_pvalue"][best]), 4),
            "layer0_accuracy": round(float(m["accuracy"][0]), 3), "embedding_at_chance": r.embedding_at_chance,
            "length_accuracy": round(float(m["length_accuracy"][0]), 3),
            "max_shuffled_accuracy": round(float(np.nanmax(m["shuffled_accuracy"])), 3),
            "accuracy": _curve(m["accuracy"]), "ci_low": _curve(m["ci_low"]), "ci_high": _curve(m["ci_high"]),
        }, ensure_ascii=False), flush=True)
    if out_dir is not None:
        import matplotlib.pyplot as plt

        fig = verdicts["harmless"].plot(others=[verdicts["generic"]])
        fig.savefig(out_dir / "claim1-both-harmless-sets.png")
        plt.close(fig)
        import pandas as pd

        pd.concat([v.to_frame() for v in verdicts.values()]).to_csv(out_dir / "claim1-verdicts.csv", index=False)
    return verdicts


def leak(sets: dict, jbs: dict, info: dict, n_jobs: int | None) -> None:
    """Claim 3's transfer probe: leaky (trained on every harmbench request) vs leak-free (cross-fit by
    request) fraction of jailbroken harmful prompts classified harmful, per layer."""
    two = ls.Residuals.concat([sets["harmless"], sets["harmbench"]])
    for method, ja in jbs.items():
        leaky = ls.probe_transfer(two, ja, holdout=None, n_jobs=n_jobs)
        fair = ls.probe_transfer(two, ja, holdout="crossfit", n_jobs=n_jobs)
        # layer 0 is excluded: its features are identical for every prompt (the template's last token), so
        # its "rate" is the majority class of the training fold, which holding requests out shifts
        diff = (leaky.positive_rate - fair.positive_rate)[1:]
        print(json.dumps({
            "transfer": f"jailbreak:{method}", **info, "classifier": "svm", "train_n": len(two), "n": fair.n,
            "n_seen": fair.n_seen, "leaky_rate": _curve(leaky.positive_rate),
            "leak_free_rate": _curve(fair.positive_rate), "leak_free_ci_low": _curve(fair.rate_low),
            "leak_free_ci_high": _curve(fair.rate_high), "max_inflation_layers_1+": round(float(diff.max()), 3),
            "max_inflation_layer": int(np.argmax(diff)) + 1, "mean_inflation_layers_1+": round(float(diff.mean()), 3),
            "mean_abs_difference_layers_1+": round(float(np.abs(diff).mean()), 3),
        }), flush=True)


def real(model_name: str | None, chat: bool | None, methods: list[str], n_jailbreak: int, out: str | None,
         n_jobs: int | None, classifiers: list[str], n_per: int, borderline: bool) -> None:
    sets, jbs, info, capture_s = _capture_all(model_name, chat, methods, n_jailbreak, n_per, borderline)
    from pathlib import Path

    out_dir = None
    if out:
        import matplotlib

        matplotlib.use("Agg")
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
    name = info["model"]
    verdicts = claim1(sets, info, n_per, n_jobs, out_dir)
    leak(sets, jbs, info, n_jobs)
    acts = ls.Residuals.concat([sets["harmless"], sets["harmbench"]])
    results = {}
    for clf in classifiers:
        t0 = time.perf_counter()
        if clf == "svm":  # the same fit as claim 1's matched-set row: reuse it
            r = verdicts["harmless"].result
        else:
            r = ls.probe_layers(acts, classifier=clf, cv=5, n_jobs=n_jobs, progress=False)
        dt = time.perf_counter() - t0
        results[clf] = r
        m = r.metrics
        first = r.first_layer_above(0.95)
        print(json.dumps({
            "bench": "probe_layers", "data": "real", **info, "classifier": clf, "n": len(acts),
            "layers": len(r.layers), "d_model": acts.d_model, "folds": 5, "controls": True, "n_jobs": n_jobs,
            "seconds": round(dt, 2) if clf != "svm" else None, "capture_seconds": round(capture_s, 1),
            "first_layer_ge_0.95": first._asdict() if first else None,
            "best": r.best_layer()._asdict(), "layer0_accuracy": round(float(m["accuracy"][0]), 3),
            "embedding_at_chance": r.embedding_at_chance, "chance": round(r.chance, 3),
            "max_shuffled_accuracy": round(float(np.nanmax(m["shuffled_accuracy"])), 3),
            "length_accuracy": round(float(m["length_accuracy"][0]), 3),
            "accuracy": _curve(m["accuracy"]), "ci_low": _curve(m["ci_low"]), "auroc": _curve(m["auroc"]),
            "direction_cosine": _curve(m["direction_cosine"]),
        }), flush=True)
    main_clf = results[classifiers[0]]
    if "borderline" in sets:
        t = main_clf.transfer_to(sets["borderline"])
        print(json.dumps({"transfer": "borderline", "model": name, "classifier": main_clf.classifier, "n": t.n,
                          "fraction_classified_harmful": _curve(t.positive_rate)}), flush=True)
    if jbs:
        three = ls.Residuals.concat([acts] + list(jbs.values()))
        r3 = ls.probe_layers(three, classifier=classifiers[0], cv=5, n_jobs=n_jobs, progress=False)
        first = r3.first_layer_above(0.95)
        print(json.dumps({"task": "3-way", "model": name, "classifier": r3.classifier, "n": r3.n,
                          "splitter": r3.params["splitter"], "n_groups": r3.params["n_groups"],
                          "chance": round(r3.chance, 3), "first_layer_ge_0.95": first._asdict() if first else None,
                          "length_accuracy": round(float(r3.metrics["length_accuracy"][0]), 3),
                          "accuracy": _curve(r3.metrics["accuracy"]),
                          "shuffled": _curve(r3.metrics["shuffled_accuracy"])}), flush=True)
    if out_dir is not None:
        for clf, r in results.items():
            r.to_frame().to_csv(out_dir / f"{name}-{clf}.csv", index=False)
        main_clf.save(out_dir / f"{name}-{main_clf.classifier}")
        others = {f"{name} · {k}": v for k, v in results.items() if v is not main_clf}
        main_clf.plot(others=others).savefig(out_dir / f"{name}-probes.png")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--n-jobs", type=int, default=None)
    ap.add_argument("--classifiers", default="svm,logistic,diffmeans")
    ap.add_argument("--real", action="store_true", help="measure on a real model (run under the flock)")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--model", default=None, help="embedded model name (default: the default model)")
    ap.add_argument("--no-chat", action="store_true", help="raw prompts, no chat template")
    ap.add_argument("--jailbreaks", default="prefix_injection,few_shot")
    ap.add_argument("--n-per", type=int, default=200, help="prompts per class for claim 1 and the transfer probe")
    ap.add_argument("--n-jailbreak", type=int, default=48)
    ap.add_argument("--borderline", action="store_true", help="also the borderline set's fraction called harmful")
    ap.add_argument("--out", default=None, help="folder for CSV frames, the saved SVM probes and a figure")
    a = ap.parse_args()
    if not a.skip_synthetic:
        res = synthetic(a.n)
        for clf in a.classifiers.split(","):
            for controls in (False, True):
                print(json.dumps(bench(res, clf, a.n_jobs, controls, "synthetic")), flush=True)
    if a.real:
        methods = [m for m in a.jailbreaks.split(",") if m]
        real(a.model, False if a.no_chat else None, methods, a.n_jailbreak, a.out, a.n_jobs,
             a.classifiers.split(","), a.n_per, a.borderline)


if __name__ == "__main__":
    main()
