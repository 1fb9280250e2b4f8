"""Small real-model graft run: final layer excluded from "best", the default judge, the earliest layer
where most refused requests comply (Wilson CI).

Run:  cd /work/main && . .venv/bin/activate && HF_HUB_OFFLINE=1 python benchmarks/graft_small.py
"""
import json
import time

import torch

import lens_safety as ls

torch.set_num_threads(1)
t0 = time.time()
model = ls.load_model()
harmful = ls.load_prompts("harmbench").sample(24, seed=0)
harmless = ls.load_prompts("harmless").sample(24, seed=0)
judge = ls.default_judge(model)
base = ls.refusal.generate(model, harmful, max_new_tokens=24, batch_size=8, progress=False)
refused = ls.PromptSet([p for p, r in zip(harmful, judge(base, [p.text for p in harmful])) if r][:8], name="refused")
donor = ls.collect_residuals(model, harmless, batch_size=8, progress=False)
g = ls.graft(model, refused, donor, layers=[4, 8, 12, 16, 20, 24], max_new_tokens=16, batch_size=8)
f = g.to_frame()
print(f[["layer", "final", "delta", "delta_ci_low", "delta_ci_high", "n_flipped", "n_refused_before",
         "flipped_ci_low", "flipped_ci_high"]].round(3).to_string())
print(json.dumps(ls.store.jsonable(g.summary()), indent=1))
for layer in [None, 12, 16, 20, 24]:
    print(layer, [c[:60] for c in g.completions[layer][:3]])
print("seconds", round(time.time() - t0))
