"""What a longer reply costs: greedy generation of 24 / 48 / 96 new tokens on the default model.

The judge reads the reply the run generates; ``benchmarks/judge_agreement.py`` measures how its
agreement with human labels grows with the reply's length (24 / 48 / 96 tokens), this script what
each length costs, on the same prompts in one run (so the ratios hold on a loaded machine too).

    python benchmarks/bench_reply_length.py --n 16 --out benchmarks/results/reply_length.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="HarmBench prompts (default 16)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/reply_length.json"))
    args = ap.parse_args(argv)
    import torch

    import lens_safety as ls
    from lens_safety.refusal import generate

    torch.set_num_threads(2)
    model = ls.load_model()
    prompts = ls.load_prompts("harmbench").sample(args.n, seed=0)
    generate(model, prompts[:2], max_new_tokens=4, progress=False)  # warm up
    rows = []
    for k in (24, 48, 96):
        t = time.perf_counter()
        generate(model, prompts, max_new_tokens=k, batch_size=args.batch_size, progress=False)
        dt = time.perf_counter() - t
        rows.append({"max_new_tokens": k, "seconds": round(dt, 2), "s_per_prompt": round(dt / args.n, 3)})
        print(rows[-1], flush=True)
    for r in rows:
        r["ratio_to_24"] = round(r["seconds"] / rows[0]["seconds"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": model.name, "n": args.n, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
