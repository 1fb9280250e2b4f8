"""Refusal direction on the default model: selection, ablation, addition, orthogonalisation. Prints JSON.

Two steps, so each fits a shared 2-core machine (the second reuses the first's direction):

    python benchmarks/bench_directions.py select --out OUT [--n-train 128 --n-val 32 --layers 10,11,12]
    python benchmarks/bench_directions.py effects --out OUT [--n-eval 32 --max-new-tokens 24]

``select`` writes OUT/direction (safetensors + JSON), OUT/candidates.csv, OUT/selection.png and
prints the selection summary with timings (seconds per candidate, forward rows). ``effects``
evaluates held-out prompts (the rest of the same seeded split): judge refusal rate of harmbench
plain vs ablated, harmless plain vs added vs ablated, borderline plain vs added, harmless KL and
completion cross-entropy, a coefficient sweep with the cautious-system-prompt baseline, the
direction's logit lens, and the orthogonalised model (first-token scores vs the hooks, and its
own greedy refusal rate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _dump(path: Path, res: dict) -> None:
    path.write_text(json.dumps(res, indent=1, default=str))
    _log(f"wrote {path}")


def select(args) -> dict:
    import lens_safety as ls

    t0 = time.perf_counter()
    model = ls.load_model(args.model)
    _log(f"loaded {model} in {time.perf_counter() - t0:.0f}s")
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    coeffs = tuple(float(c) for c in args.coeffs.split(","))
    try:
        sel = ls.select_refusal_direction(
            model, ls.load_prompts("harmbench"), ls.load_prompts("harmless"), n_train=args.n_train,
            n_val=args.n_val, layers=layers, screen=args.screen or None, top_k=args.top_k,
            batch_size=args.batch_size, seed=args.seed, min_per_split=args.min_per_split, coeffs=coeffs)
    except ls.errors.InputError as e:
        if getattr(e, "selection", None) is not None:
            e.selection.to_frame().to_csv(out / "candidates.csv", index=False)
            print(json.dumps({"step": "select", "error": str(e), "timings": e.selection.timings,
                              "baseline": e.selection.baseline,
                              "candidates": e.selection.to_frame().to_dict(orient="records")}, indent=1,
                             default=str))
        raise
    sel.direction.save(out / "direction")
    frame = sel.to_frame()
    frame.to_csv(out / "candidates.csv", index=False)
    fig = sel.plot()
    fig.savefig(out / "selection.png", dpi=110)
    best = frame[frame["reason"].isin(["", "kl > 0.1", "addition not > 0"])].sort_values("ablation_score").head(8)
    return {"step": "select", "model": model.name, "direction": repr(sel.direction), **sel.summary(),
            "timings": sel.timings, "config": {k: v for k, v in sel.config.items() if not k.endswith("hash")
                                               and not k.endswith("hashes")},
            "best_candidates": best.to_dict(orient="records"),
            "load_plus_select_s": time.perf_counter() - t0}


def _direction_by_hand(model, args):
    """The difference of means at (--layer, --position) on the same filtered train split as ``select``
    (its residuals are cached), when the selection's filters removed every candidate; the addition
    coefficient is picked on harmless validation prompts as ``select`` would."""
    import lens_safety as ls
    from lens_safety import directions as D

    sc = ls.refusal.first_token_scores
    sets = {}
    for name, sign in (("harmbench", 1), ("harmless", -1)):
        tr, va, _ = D.split_prompts(ls.load_prompts(name), args.n_train, args.n_val, args.seed, name)
        keep = [ls.PromptSet([p for p, v in zip(ps, sc(model, ps)) if sign * v > 0], ps.name) for ps in (tr, va)]
        sets[name] = keep
    k = D.template_positions(model)
    diff, rel = D.candidate_directions(model, sets["harmbench"][0], sets["harmless"][0], k)
    layer, pos = args.layer, args.position
    d = ls.RefusalDirection(diff[layer, k + pos], layer, pos, model.name, model.weights_hash, model.n_layers,
                            {"selection": {"n_train": {w: len(sets[w][0]) for w in sets},
                                           "n_val": {w: len(sets[w][1]) for w in sets}, "by_hand": True},
                             "rel_norm": float(rel[layer, k + pos])})
    coeffs = tuple(float(c) for c in args.coeffs.split(","))
    sw = D.coefficient_sweep(model, d, sets["harmless"][1][:8], coeffs=coeffs, system=None)
    frac = (sw.scores > 0).mean(1)
    ok = [c for c, f in zip(coeffs, frac) if f >= 0.9]
    d.meta["addition_coeff"] = min(ok) if ok else max(coeffs)
    d.meta["val_coeff_sweep"] = {str(c): float(f) for c, f in zip(coeffs, frac)}
    _log(f"direction by hand {d}; val coeff sweep {d.meta['val_coeff_sweep']}")
    d.save(Path(args.out) / "direction")
    return d


def effects(args) -> dict:
    import lens_safety as ls
    from lens_safety import directions as D

    t0 = time.perf_counter()
    model = ls.load_model(args.model)
    if args.layer is not None:
        d = _direction_by_hand(model, args)
    else:
        d = ls.RefusalDirection.load(Path(args.out) / "direction")
    d.check_model(model)
    cfg = d.meta["selection"]
    n_tr, n_va = cfg["n_train"], cfg["n_val"]
    # the same seeded split as the selection: the held-out rest of each set
    h_rest = D.split_prompts(ls.load_prompts("harmbench"), args.n_train, args.n_val, args.seed)[2][:args.n_eval]
    b_rest = D.split_prompts(ls.load_prompts("harmless"), args.n_train, args.n_val, args.seed)[2][:args.n_eval]
    borderline = ls.load_prompts("borderline").sample(args.n_borderline, seed=0) if args.n_borderline else None
    coeff = d.meta.get("addition_coeff", 1.0) if args.coeff is None else args.coeff
    _log(f"loaded; direction {d}, coeff {coeff}; kept train {n_tr} val {n_va}")
    t = time.perf_counter()
    eff = D.direction_effects(model, d, h_rest, b_rest, borderline, coeff=coeff, max_new_tokens=args.max_new_tokens,
                              batch_size=16)
    effects_s = time.perf_counter() - t
    _log(f"effects {effects_s:.0f}s\n{eff.to_frame().to_string()}")
    res: dict = {"step": "effects", "model": model.name, "direction": repr(d), "coeff": coeff,
                 "direction_meta": d.meta,
                 "table": eff.to_frame().to_dict(orient="records"), "kl_harmless_ablated": eff.kl_harmless,
                 "ce_harmless_completions": eff.ce, "effects_s": effects_s}
    out = Path(args.out)
    eff.plot().savefig(out / "effects.png", dpi=110)
    res["logit_lens"] = D.direction_logit_lens(model, d, top_k=10).to_dict(orient="records")
    _dump(out / "effects.json", res)
    if args.orthogonalize:
        t = time.perf_counter()
        orth = ls.orthogonalize(model, d)
        hooked = ls.refusal.first_token_scores(model, h_rest, fwd_hooks=ls.ablate(d))
        baked = ls.refusal.first_token_scores(orth, h_rest)
        r = ls.evaluate_refusal(orth, h_rest, max_new_tokens=args.max_new_tokens, progress=False)
        with ls.ablate(d, model=model):
            r_hook = ls.evaluate_refusal(model, h_rest, max_new_tokens=args.max_new_tokens, progress=False)
        res["orthogonalized"] = {
            "max_abs_score_diff_vs_hooks": float((hooked - baked).abs().max()),
            "harmful_refusal_rate": r.refusal_rate, "harmful_refusal_rate_hooks": r_hook.refusal_rate,
            "same_completions": int(sum(a == b for a, b in zip(r.completions, r_hook.completions))),
            "n": len(r), "seconds": time.perf_counter() - t}
        del orth
        _dump(out / "effects.json", res)
    if args.sweep:
        t = time.perf_counter()
        sw = D.coefficient_sweep(model, d, ls.PromptSet(list(h_rest[:args.sweep]) + list(b_rest[:args.sweep])),
                                 coeffs=(-2.0, -1.0, 0.0, 1.0, 2.0, 4.0))
        res["sweep"] = sw.to_frame().to_dict(orient="records")
        res["sweep_s"] = time.perf_counter() - t
        sw.plot().savefig(out / "sweep.png", dpi=110)
    res["total_s"] = time.perf_counter() - t0
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=["select", "effects"])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--n-train", type=int, default=128)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--min-per-split", type=int, default=4)
    p.add_argument("--layers", default="", help="comma-separated residual layers (default: every layer < 0.8 depth)")
    p.add_argument("--screen", type=int, default=8, help="harmful val prompts of the screening pass (0: none)")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--coeffs", default="1,1.5,2,3,4", help="addition coefficients tried on validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=32)
    p.add_argument("--n-borderline", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--coeff", type=float, default=None)
    p.add_argument("--sweep", type=int, default=8, help="prompts per set in the coefficient sweep (0: skip)")
    p.add_argument("--orthogonalize", action="store_true")
    p.add_argument("--layer", type=int, default=None, help="effects: build the direction at this layer by hand")
    p.add_argument("--position", type=int, default=-1)
    args = p.parse_args(argv)
    res = select(args) if args.step == "select" else effects(args)
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
