"""Refusal rates, score/judge agreement and attack success per jailbreak family on a real model.

Run (loads the real model; on a shared machine wrap it in the model lock)::

    flock /tmp/lens_safety_model.lock python benchmarks/measure_refusal.py \
        --harmless 64 --borderline 48 --per-family 24 --long-per-family 8 --json /tmp/refusal.json

Prints a markdown table and (with ``--json``) writes the numbers. Everything goes through
the public API and its disk cache, so a rerun with the same sizes only re-reads results.
Samples are seeded (``--seed``). Greedy decoding, ``--max-new-tokens`` (default 48).
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
    args = ap.parse_args()

    import torch

    import lens_safety as ls
    from lens_safety import refusal as R

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
        res = R.evaluate_refusal(model, ps, args.max_new_tokens, args.batch_size, progress=False)
        results[name] = res
        out["sets"][name] = {"n": len(res), "refusal_rate": res.refusal_rate, "agreement": res.agreement,
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
    refused = ls.PromptSet([p for p, r in zip(plain.prompts, plain.refused) if r], name="harmbench-refused")
    for method in methods:
        long = method in LONG_METHODS
        k = min(args.long_per_family if long else args.per_family, len(refused))
        if k == 0:
            break
        t = time.time()
        pairs = R.jailbreak_pairs(model, refused.sample(k, seed=args.seed), [method],
                                  max_new_tokens=args.max_new_tokens,
                                  batch_size=args.long_batch_size if long else args.batch_size, progress=False)
        row = pairs.asr.iloc[0].to_dict() if len(pairs.asr) else {"method": method, "n": k}
        row["seconds"] = round(time.time() - t, 1)
        row["n_pairs"] = len(pairs)
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


if __name__ == "__main__":
    main()
