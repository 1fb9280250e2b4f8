"""Train the default tuned lens of the default model (cached) and compare it with the logit lens.

Prints one JSON object: the training budget and time (with the CPU load average, the machine is
shared), per-layer held-out KL(final || readout) for both lenses with 95% CIs, the layer where
refusal mass emerges (mean refusal mass > mean affirmation mass and > 0.01) for each lens, and the
first layer where the first-token refusal score of harmful prompts is above that of harmless ones
(disjoint 95% t intervals) for each lens.

Run:  cd /work/main && . .venv/bin/activate && HF_HUB_OFFLINE=1 \\
      python benchmarks/train_tuned_lens.py [--threads 1] [--held-out 32] [--steps N] [--out DIR]
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch

import lens_safety as ls
from lens_safety.tuned_lens import TunedLensConfig, held_out_prompts

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--held-out", type=int, default=32, help="held-out prompts per class (harmful, harmless)")
ap.add_argument("--out", default="/tmp/tuned_lens_measure")
for f in TunedLensConfig.__dataclass_fields__:
    ap.add_argument(f"--{f.replace('_', '-')}", type=type(getattr(TunedLensConfig(), f)), default=None)
args = ap.parse_args()
torch.set_num_threads(args.threads)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
overrides = {f: getattr(args, f) for f in TunedLensConfig.__dataclass_fields__ if getattr(args, f) is not None}

t0 = time.time()
model = ls.load_model()
load_s = time.time() - t0
load_before = os.getloadavg()[0]
t = time.time()
lens = ls.train_tuned_lens(model, progress=False, **overrides)  # cached: a second run only loads it
wall = time.time() - t
lens.plot().savefig(out / "tuned_lens_training.png", dpi=120)

held = held_out_prompts(args.held_out)
t = time.time()
acts = ls.collect_residuals(model, held, batch_size=8, progress=False)
cmp = ls.compare_lenses(model, acts, lens)
eval_s = time.time() - t
cmp.kl.to_csv(out / "lens_kl.csv", index=False)
cmp.to_frame().to_csv(out / "lens_category_mass.csv", index=False)
cmp.plot().savefig(out / "lens_comparison.png", dpi=120)
m = cmp.metrics()
mass = cmp.to_frame()
refusal_mass = {f"{lens_name}/{label}": [round(v, 4) for v in g.sort_values("layer")["mean"]]
                for (lens_name, label), g in mass[mass.category == "refusal"].groupby(["lens", "label"])}
print(json.dumps({
    "model": model.name, "config": lens.config, "data": {k: v for k, v in lens.data.items() if k != "key"},
    "train_seconds_recorded": lens.train_seconds, "this_call_seconds": round(wall, 1),
    "load_average_at_start": round(load_before, 2), "load_average_at_end": round(os.getloadavg()[0], 2),
    "cpu_count": os.cpu_count(), "torch_threads": args.threads, "model_load_seconds": round(load_s, 1),
    "held_out": {"n": len(held), "eval_seconds": round(eval_s, 1)},
    "kl": {k: [round(v, 3) for v in vals] for k, vals in m["kl"].items()},
    "kl_ci": {name: [[round(a, 3), round(b, 3)] for a, b in zip(g.sort_values("layer").ci_low,
                                                                 g.sort_values("layer").ci_high)]
              for name, g in cmp.kl.groupby("lens")},
    "emergence_layer": m["emergence_layer"], "refusal_mass": refusal_mass,
    "score_separation_layer": m["score_separation_layer"],
    "refusal_score": {f"{lens_name}/{label}": [round(v, 2) for v in g.sort_values("layer")["score"]]
                      for (lens_name, label), g in cmp.scores().groupby(["lens", "label"])},
    "training_kl_first_last": [round(lens.history[0], 3), round(sum(lens.history[-10:]) / 10, 3)],
}, indent=1))
