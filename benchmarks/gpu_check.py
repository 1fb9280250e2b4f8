"""On a CUDA machine: capture, lens, patching and generation on the default model, on the GPU in
float32 and bfloat16, against the same stages on the CPU in float32 (max differences) and timed.

    python benchmarks/gpu_check.py [--n 64] [--gen 16] [--pairs 8]     # prints JSON rows

Each stage prints one JSON row per (device, dtype): ``prompts_per_s`` and the largest
difference from the CPU float32 numbers (residuals: max |diff| and max relative norm error per
vector; lens: max |diff| over the float columns of ``LensResult.to_frame()``; generation:
refusal rate and the share of identical greedy completions; patching: max |diff| of the mean
recovery). ``--dry-run`` checks the script itself without a GPU (tiny random model, CPU
float32 vs CPU bfloat16, two planted pairs for patching). A stage that fails reports its
error and the others still run. The last line is a summary row. Without a CUDA device (and
without ``--dry-run``) it prints one row saying so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback


def _emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def _frame_diff(a, b) -> float:
    """Largest |a - b| over the numeric columns two result frames share (same row order)."""
    import numpy as np
    from pandas.api.types import is_float_dtype

    # float columns only: integer columns are token ids, ranks or counts, not numbers to compare
    cols = [c for c in a.columns if c in b.columns and is_float_dtype(a[c])]
    if not cols or len(a) != len(b):
        return float("nan")
    return float(np.nanmax(np.abs(a[cols].to_numpy(float) - b[cols].to_numpy(float))))


def _check_config(ls, torch, device: str, dtype: str, args, prompts, gen_prompts, harmful, ref: dict,
                  summary: dict, timed, name: str | None = None) -> None:
    """Every stage on one (device, dtype); the first config run fills ``ref`` (the CPU numbers)."""
    tag = f"{device}-{dtype}"
    try:
        model, load_s = timed(lambda: ls.load_model(name, device=device, dtype=dtype))
    except Exception as e:  # report and go on
        _emit({"stage": "load", "config": tag, "error": f"{type(e).__name__}: {e}"})
        return
    _emit({"stage": "load", "config": tag, "seconds": round(load_s, 2), "device": str(model.device),
           "dtype": str(model.dtype)})

    def stage(name, fn, n_items):
        try:
            (result, row), secs = timed(fn)
            row = {"stage": name, "config": tag, "seconds": round(secs, 3),
                   "prompts_per_s": round(n_items / secs, 2), **row}
            summary[f"{name}_{tag}_prompts_per_s"] = row["prompts_per_s"]
            for k in ("max_abs_diff", "max_rel_err"):
                if k in row:
                    summary[f"{name}_{tag}_{k}"] = row[k]
            _emit(row)
            return result
        except Exception as e:
            _emit({"stage": name, "config": tag, "error": f"{type(e).__name__}: {e}",
                   "trace": traceback.format_exc(limit=3)[-800:]})
            return None

    def capture():
        acts = ls.collect_residuals(model, prompts, cache=False, progress=False, batch_size=args.batch_size)
        row = {"shape": list(acts.values.shape), "stored_dtype": str(acts.values.dtype),
               "stored_device": str(acts.values.device)}
        if "acts" in ref:
            r = ref["acts"].values
            row["max_abs_diff"] = float((acts.values - r).abs().max())
            row["max_rel_err"] = float(((acts.values - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-12)).max())
        else:
            ref["acts"] = acts
        return acts, row

    acts = stage("capture", capture, len(prompts))

    def lens():
        out = ls.logit_lens(model, acts)
        frame = out.to_frame()
        row = {}
        if "lens" in ref:
            row["max_abs_diff"] = _frame_diff(frame, ref["lens"])
        else:
            ref["lens"] = frame
        return out, row

    if acts is not None:
        stage("lens", lens, len(prompts))

    def generation():
        res = ls.evaluate_refusal(model, gen_prompts, max_new_tokens=32, cache=False, progress=False,
                                  batch_size=args.batch_size)
        frame = res.to_frame()
        row = {"refusal_rate": float(res.refusal_rate) if not callable(res.refusal_rate)
               else float(res.refusal_rate())}
        col = next((c for c in ("completion", "reply", "text_out") if c in frame.columns), None)
        if "gen" in ref and col is not None:
            same = (frame[col].to_numpy() == ref["gen"][col].to_numpy()).mean()
            row["identical_completions"] = float(same)
        elif col is not None:
            ref["gen"] = frame
        return res, row

    stage("generation", generation, len(gen_prompts))

    def patching():
        if "pairs" not in ref:
            ref["pairs"] = ls.jailbreak_pairs(model, list(harmful)[:args.pairs], methods=["prefix_injection"],
                                              cache=False, progress=False, max_new_tokens=32)
        pairs = ref["pairs"]
        if len(pairs) == 0 and args.dry_run:  # a random tiny model never complies: plant two pairs
            plain = list(harmful)[:2]
            wrapped = list(ls.jailbreak(ls.PromptSet(plain, "plain"), "prefix_injection"))
            pairs = ref["pairs"] = ls.PairSet(
                [ls.JailbreakPair(p.text, "prefix_injection", p, j, "I'm sorry", "Sure", 5.0, -5.0)
                 for p, j in zip(plain, wrapped)], model_name=model.name, weights_hash=model.weights_hash)
        if pairs.weights_hash != model.weights_hash:  # same requests, re-keyed to this dtype's weights
            pairs = ls.PairSet(list(pairs), model_name=model.name, weights_hash=model.weights_hash,
                               config=getattr(pairs, "config", None))
        if len(pairs) == 0:
            return None, {"error": "no effective pairs"}
        out = ls.patch_layers(model, pairs, components=("resid_pre",), progress=False,
                              min_gap=None if args.dry_run else 1.0)
        curve = out.mean_recovery("resid_pre") if callable(out.mean_recovery) else out.mean_recovery
        curve = torch.as_tensor(getattr(curve, "values", curve), dtype=torch.float64).flatten()
        row = {"n_pairs": len(pairs), "break_layer": str(out.break_layer())}
        if "patch" in ref:
            row["max_abs_diff"] = float((curve - ref["patch"]).abs().max())
        else:
            ref["patch"] = curve
        return out, row

    stage("patching", patching, args.pairs)
    del model
    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="prompts for capture and the lens (default 64)")
    ap.add_argument("--gen", type=int, default=16, help="prompts for generation (default 16)")
    ap.add_argument("--pairs", type=int, default=8, help="harmful requests tried for patching pairs (default 8)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dry-run", action="store_true", help="no GPU needed: a tiny random model, CPU float32 vs CPU "
                    "bfloat16, to check this script itself")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        _emit({"cuda": False, "message": "no CUDA device: gpu_check needs an NVIDIA GPU (torch.cuda.is_available() "
               "is False); nothing was run. On a GPU machine install a CUDA build of torch and rerun."})
        return 0

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lens_safety as ls

    harmful, harmless = ls.load_prompts("harmbench"), ls.load_prompts("harmless")
    half = args.n // 2
    prompts = ls.PromptSet(list(harmful)[:half] + list(harmless)[:args.n - half], "gpu-check")
    gen_prompts = ls.PromptSet(list(harmful)[:args.gen], "gpu-check-gen")
    summary: dict = {"cuda": torch.cuda.is_available(),
                     "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                     "n": args.n, "gen": args.gen,
                     "torch": torch.__version__}

    def timed(fn):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    configs = [("cpu", "float32"), ("cuda", "float32"), ("cuda", "bfloat16")]
    name = None
    if args.dry_run:
        import tempfile

        name = tempfile.mkdtemp(prefix="gpu-check-tiny-")
        ls.testing.tiny_hf_model(seed=0).save_pretrained(name)
        ls.testing.tiny_tokenizer().save_pretrained(name)
        configs = [("cpu", "float32"), ("cpu", "bfloat16")]
        summary["dry_run"] = True
    ref: dict = {}
    for device, dtype in configs:
        _check_config(ls, torch, device, dtype, args, prompts, gen_prompts, harmful, ref, summary, timed, name)
    _emit({"summary": True, **summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
