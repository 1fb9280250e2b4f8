"""Speed of probe_layers: 25 layers × 5 folds of the linear probes on ~600 prompts, d_model 896.

Run: ``python benchmarks/bench_probes.py [--n 600] [--n-jobs 1]``. Prints one JSON row per
configuration. Synthetic data has the default model's shape (24 blocks + embedding, 896) with a
class signal that grows with depth. Target: the linear probes under 30 s on 2 cores.

``--real [--model NAME] [--no-chat] [--out DIR]`` also measures the science on a real model
(the script takes ``/tmp/lens_safety_model.lock`` itself, only while capturing): harmbench (200) vs harmless (372) with
5-fold CV and controls (timed), the first layer with accuracy ≥ 0.95, the jailbreak transfer
curve (probes trained on harmful vs harmless, applied to jailbroken harmful prompts), the 3-way
task and the borderline set's fraction classified harmful. Residuals are cached
(``$LENS_SAFETY_HOME/activations``), so reruns skip the model forward.
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


def _capture_all(model_name: str | None, chat: bool | None, methods: list[str], n_jailbreak: int):
    """Load the model and capture (or read from the cache) every residual set, holding the shared
    model lock (``/tmp/lens_safety_model.lock``) only for this part."""
    import fcntl

    with open("/tmp/lens_safety_model.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        model = ls.load_model(model_name)
        harmful, harmless = ls.load_prompts("harmbench"), ls.load_prompts("harmless")
        t0 = time.perf_counter()
        acts = ls.collect_residuals(model, harmful + harmless, chat=chat, progress=False)
        capture_s = time.perf_counter() - t0
        border = ls.collect_residuals(model, ls.load_prompts("borderline"), chat=chat, progress=False)
        jbs = {m: ls.collect_residuals(model, ls.jailbreak(harmful.sample(n_jailbreak, seed=0), m), chat=chat,
                                       progress=False) for m in methods}
        info = {"model": model.name, "chat": model.formatting_key(chat=chat)["chat"], "n_layers": model.n_layers}
        del model
    return acts, border, jbs, info, capture_s


def real(model_name: str | None, chat: bool | None, methods: list[str], n_jailbreak: int, out: str | None,
         n_jobs: int | None, classifiers: list[str]) -> None:
    acts, border, jbs, info, capture_s = _capture_all(model_name, chat, methods, n_jailbreak)
    name = info["model"]
    results = {}
    for clf in classifiers:
        t0 = time.perf_counter()
        r = ls.probe_layers(acts, classifier=clf, cv=5, n_jobs=n_jobs, progress=False)
        dt = time.perf_counter() - t0
        results[clf] = r
        m = r.metrics
        first = r.first_layer_above(0.95)
        print(json.dumps({
            "bench": "probe_layers", "data": "real", **info, "classifier": clf, "n": len(acts),
            "layers": len(r.layers), "d_model": acts.d_model, "folds": 5, "controls": True, "n_jobs": n_jobs,
            "seconds": round(dt, 2), "capture_seconds": round(capture_s, 1),
            "first_layer_ge_0.95": first._asdict() if first else None,
            "best": r.best_layer()._asdict(), "layer0_accuracy": round(float(m["accuracy"][0]), 3),
            "embedding_at_chance": r.embedding_at_chance, "chance": round(r.chance, 3),
            "max_shuffled_accuracy": round(float(np.nanmax(m["shuffled_accuracy"])), 3),
            "length_accuracy": round(float(m["length_accuracy"][0]), 3),
            "accuracy": _curve(m["accuracy"]), "ci_low": _curve(m["ci_low"]), "auroc": _curve(m["auroc"]),
            "direction_cosine": _curve(m["direction_cosine"]),
        }), flush=True)
    main_clf = results[classifiers[0]]
    t = main_clf.transfer_to(border)
    print(json.dumps({"transfer": "borderline", "model": name, "classifier": main_clf.classifier, "n": t.n,
                      "fraction_classified_harmful": _curve(t.positive_rate)}), flush=True)
    for method, ja in jbs.items():
        t = main_clf.transfer_to(ja)
        print(json.dumps({"transfer": f"jailbreak:{method}", "model": name, "classifier": main_clf.classifier,
                          "n": t.n, "fraction_classified_harmful": _curve(t.positive_rate),
                          "ci_low": _curve(t.rate_low), "ci_high": _curve(t.rate_high)}), flush=True)
    if jbs:
        three = ls.Residuals.concat([acts] + list(jbs.values()))
        r3 = ls.probe_layers(three, classifier=classifiers[0], cv=5, n_jobs=n_jobs, progress=False)
        first = r3.first_layer_above(0.95)
        print(json.dumps({"task": "3-way", "model": name, "classifier": r3.classifier, "n": r3.n,
                          "chance": round(r3.chance, 3), "first_layer_ge_0.95": first._asdict() if first else None,
                          "accuracy": _curve(r3.metrics["accuracy"]),
                          "shuffled": _curve(r3.metrics["shuffled_accuracy"])}), flush=True)
    if out:
        from pathlib import Path

        import matplotlib

        matplotlib.use("Agg")
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        for clf, r in results.items():
            r.to_frame().to_csv(d / f"{name}-{clf}.csv", index=False)
        main_clf.save(d / f"{name}-{main_clf.classifier}")
        others = {f"{name} · {k}": v for k, v in results.items() if v is not main_clf}
        main_clf.plot(others=others).savefig(d / f"{name}-probes.png")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--n-jobs", type=int, default=None)
    ap.add_argument("--classifiers", default="svm,logistic,diffmeans")
    ap.add_argument("--real", action="store_true", help="measure on a real model (run under the flock)")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--model", default=None, help="embedded model name (default: the default model)")
    ap.add_argument("--no-chat", action="store_true", help="raw prompts, no chat template")
    ap.add_argument("--jailbreaks", default="gcg,nested_fiction,prefix_injection")
    ap.add_argument("--n-jailbreak", type=int, default=64)
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
             a.classifiers.split(","))


if __name__ == "__main__":
    main()
