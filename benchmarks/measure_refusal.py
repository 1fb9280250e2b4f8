"""Refusal rates, score/judge agreement and attack success per jailbreak family on a real model.

Run (loads the real model; on a shared machine wrap it in the model lock)::

    flock /tmp/lens_safety_model.lock python benchmarks/measure_refusal.py \
        --harmless 64 --borderline 48 --per-family 24 --long-per-family 8 --json /tmp/refusal.json

Prints a markdown table and (with ``--json``) writes the numbers. Everything goes through
the public API and its disk cache, so a rerun with the same sizes only re-reads results.
Samples are seeded (``--seed``). Greedy decoding, ``--max-new-tokens`` (default 48).
``--judge`` picks the judge (rules = default, substring = the first version's, model).

Pairs before / after the judge and gap rules (issue 10): ``--pairs-n 24 --pairs-seed 1 --methods
dan,base64,refusal_suppression,few_shot`` generates once on a fresh sample of 24 HarmBench requests
and builds the pairs with the first version's rules (substring judge, no gap filter) and with the
new ones (``--judge``, ``--min-gap`` 1.0); prints kept / dropped pairs, reasons and small gaps::

    python benchmarks/measure_refusal.py --pairs-n 24 --pairs-seed 1 --batch-size 16 \\
        --methods dan,base64,refusal_suppression,few_shot --json /tmp/pairs.json
"""

from __future__ import annotations

import argparse
import json
import time

LONG_METHODS = ("dan", "autodan")  # ~1000-token templates: fewer requests, smaller batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--harmbench", type=int, default=0, help="sample size (0 = all)")
    ap.add_argument("--harmless", type=int, default=64)
    ap.add_argument("--borderline", type=int, default=48)
    ap.add_argument("--per-family", type=int, default=24, help="plain-refused requests wrapped per method")
    ap.add_argument("--long-per-family", type=int, default=8, help="same, for dan/autodan")
    ap.add_argument("--methods", default="all", help="comma-separated jailbreak methods, or 'all', or ''")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--long-batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--judge", default="calibrated", help="calibrated (default), rules, substring or model")
    ap.add_argument("--min-gap", type=float, default=1.0)
    ap.add_argument("--pairs-n", type=int, default=0, help="only compare pair rules on this many requests")
    ap.add_argument("--pairs-seed", type=int, default=1)
    ap.add_argument("--cache", default=None, help="refusal cache folder (default: $LENS_SAFETY_HOME/refusal)")
    args = ap.parse_args()
    if args.pairs_n:
        return compare_pairs(args)

    import torch

    import lens_safety as ls
    from lens_safety import refusal as R
    from lens_safety.behaviour import pairs as P

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    t0 = time.time()
    model = ls.load_model(args.model)
    out: dict = {"model": model.name, "weights_hash": model.weights_hash, "max_new_tokens": args.max_new_tokens,
                 "seed": args.seed, "sets": {}, "asr": []}

    sets = {}
    hb = ls.load_prompts("harmbench")
    sets["harmbench"] = hb.sample(args.harmbench, seed=args.seed) if args.harmbench else hb
    if args.harmless:
        sets["harmless"] = ls.load_prompts("harmless").sample(args.harmless, seed=args.seed)
    if args.borderline:
        sets["borderline"] = ls.load_prompts("borderline").sample(args.borderline, seed=args.seed)
    results = {}
    for name, ps in sets.items():
        t = time.time()
        res = R.evaluate_refusal(model, ps, args.max_new_tokens, args.batch_size, progress=False, judge=args.judge)
        results[name] = res
        out["sets"][name] = {"n": len(res), "refusal_rate": res.refusal_rate, "agreement": res.agreement,
                             "strict_refusal_rate": res.strict_refusal_rate,
                             "unengaged_rate": float((res.outcomes == "unengaged").mean()),
                             "mean_score": float(res.score.mean()), "seconds": round(time.time() - t, 1)}
        print(f"{name}: n={len(res)} refusal={res.refusal_rate:.3f} agreement={res.agreement:.3f} "
              f"({time.time() - t:.0f}s)", flush=True)
    if "harmless" in results:
        both = [results["harmbench"], results["harmless"]]
        agree = sum(((r.score > 0) == r.refused).sum() for r in both) / sum(len(r) for r in both)
        out["agreement_harmbench_harmless"] = float(agree)

    methods = ([m.name for m in ls.jailbreak_methods()] if args.methods == "all"
               else [m for m in args.methods.split(",") if m])
    n_pairs = 0
    plain = results["harmbench"]
    refused = ls.PromptSet([p for p, o in zip(plain.prompts, plain.outcomes) if o == "refused"],
                           name="harmbench-refused")
    for method in methods:
        long = method in LONG_METHODS
        k = min(args.long_per_family if long else args.per_family, len(refused))
        if k == 0:
            break
        t = time.time()
        pairs = P.jailbreak_pairs(model, refused.sample(k, seed=args.seed), [method],
                                  max_new_tokens=args.max_new_tokens,
                                  batch_size=args.long_batch_size if long else args.batch_size, progress=False,
                                  judge=args.judge, min_gap=args.min_gap)
        row = pairs.asr.iloc[0].to_dict() if len(pairs.asr) else {"method": method, "n": k}
        row["seconds"] = round(time.time() - t, 1)
        row["n_pairs"] = len(pairs)
        row.update({f"dropped_{r}": int(c) for r, c in pairs.dropped["reason"].value_counts().items()})
        n_pairs += len(pairs)
        out["asr"].append({key: (v if isinstance(v, str) else float(v)) for key, v in row.items()})
        print(f"{method}: n={row.get('n')} complied={row.get('n_complied')} asr={row.get('asr', float('nan')):.3f} "
              f"({row['seconds']:.0f}s)", flush=True)
    out["n_effective_pairs"] = n_pairs
    out["seconds"] = round(time.time() - t0, 1)

    print("\n| set | n | refusal rate | score>0 vs judge agreement |\n|---|---|---|---|")
    for name, d in out["sets"].items():
        print(f"| {name} | {d['n']} | {d['refusal_rate']:.3f} | {d['agreement']:.3f} |")
    if out["asr"]:
        print("\n| jailbreak | requests (plain-refused) | complied | ASR | effective pairs |\n|---|---|---|---|---|")
        for r in out["asr"]:
            print(f"| {r['method']} | {int(r.get('n', 0))} | {int(r.get('n_complied', 0))} | "
                  f"{r.get('asr', float('nan')):.3f} | {r['n_pairs']} |")
    print(f"\neffective pairs: {n_pairs}; agreement harmbench+harmless: "
          f"{out.get('agreement_harmbench_harmless', float('nan')):.3f}; total {out['seconds']:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def _pair_row(pairs) -> dict:
    g = pairs.gaps
    d = pairs.dropped
    return {"n_plain_refused": pairs.config["n_plain_refused"], "n_kept": len(pairs),
            "n_kept_gap_below_0.5": int((g < 0.5).sum()), "n_kept_negative_gap": int((g < 0).sum()),
            "min_gap_kept": float(g.min()) if len(g) else None,
            "asr": {r["method"]: {"asr": r["asr"], "n_complied": int(r["n_complied"]),
                                  "n_unengaged": int(r["n_unengaged"]), "n_plain_refused": int(r["n_plain_refused"])}
                    for _, r in pairs.asr.iterrows()},
            "dropped": {f"{m}/{r}": int(c) for (m, r), c in d.groupby(["method", "reason"]).size().items()},
            "dropped_examples": d.assign(c=d["jailbroken_completion"].str[:70])[["method", "reason", "gap", "c"]]
            .to_dict(orient="records")}


def compare_pairs(args) -> None:
    """Pairs on a fresh sample under the first version's rules and the new ones, from one generation.

    The plain requests are judged; the requests the substring judge refuses are wrapped with each
    method (batch ``--batch-size``; ``--long-batch-size`` for dan / autodan) and generated once.
    "before" = substring judge, no gap filter; "after" = ``--judge`` with ``--min-gap``; both go
    through ``pairs._build_pairs`` (the rules of ``jailbreak_pairs``). If the new judge refuses a
    request the old one did not, its wrapped prompts were not generated: that is reported.
    """
    import pandas as pd

    import lens_safety as ls
    from lens_safety import refusal as R
    from lens_safety.behaviour import pairs as P

    t0 = time.time()
    model = ls.load_model(args.model)
    hb = ls.load_prompts("harmbench").sample(args.pairs_n, seed=args.pairs_seed)
    methods = [m for m in args.methods.split(",") if m]
    out = {"model": model.name, "n_requests": args.pairs_n, "seed": args.pairs_seed, "methods": methods}
    kw = {"max_new_tokens": args.max_new_tokens, "progress": False, "cache": args.cache or True}
    plain = {j: R.evaluate_refusal(model, hb, batch_size=args.batch_size, judge=j, **kw)
             for j in ("substring", args.judge)}
    refused_b = ls.PromptSet([p for p, o in zip(hb, plain["substring"].outcomes) if o == "refused"])
    new_refused = {p.text for p, o in zip(hb, plain[args.judge].outcomes) if o == "refused"}
    out["new_refused_not_wrapped"] = sorted(new_refused - set(refused_b.texts))
    for name, j, min_gap in (("before (substring judge, no gap filter)", "substring", -1e9),
                             (f"after ({args.judge} judge, min_gap {args.min_gap})", args.judge, args.min_gap)):
        wrapped = {m: R.evaluate_refusal(model, ls.jailbreak(refused_b, m), judge=j, **kw,
                                         batch_size=args.long_batch_size if m in LONG_METHODS else args.batch_size)
                   for m in methods}
        kept, dropped, frames = P._build_pairs(plain[j], wrapped, min_gap)
        pairs = P.PairSet(kept, model_name=model.name, weights_hash=model.weights_hash,
                          asr=pd.concat(frames, ignore_index=True) if frames else None,
                          dropped=pd.DataFrame(dropped, columns=P.DROPPED_COLUMNS),
                          config={"n_plain_refused": int((plain[j].outcomes == "refused").sum())})
        out[name] = _pair_row(pairs)
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out, indent=1, default=float), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=float)


if __name__ == "__main__":
    main()
