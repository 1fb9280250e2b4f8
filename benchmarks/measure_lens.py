"""Issue 5 / 10 / 14 measurements on the real default model: lens emergence with the logit lens and
the tuned lens, middle-layer tokens, grafting (final layer excluded, earliest majority-flip layer).

The tuned lens is the cached default one (``benchmarks/train_tuned_lens.py`` trains it; if it is
missing it is trained here first, about 10 minutes on 2 cores). Pass ``--no-tuned`` to skip it.

Run:  cd /work/main && . .venv/bin/activate && HF_HUB_OFFLINE=1 \
      python benchmarks/measure_lens.py OUTDIR [N] [--no-tuned]
"""
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import torch

import lens_safety as ls
from lens_safety import viz

argv = [a for a in sys.argv[1:] if not a.startswith("--")]
use_tuned = "--no-tuned" not in sys.argv
out = Path(argv[0] if argv else "/tmp/lens_measure")
n = int(argv[1]) if len(argv) > 1 else 32
methods = ["nested_fiction", "prefix_injection"]
out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(2)
warnings.filterwarnings("ignore", message="Glyph")
t0 = time.time()
model = ls.load_model()
print(model, f"loaded in {time.time() - t0:.0f}s", flush=True)

harmful = ls.load_prompts("harmbench").sample(n, seed=0)
harmless = ls.load_prompts("harmless").sample(n, seed=0)
sets = harmless + harmful
for m in methods:
    jb = ls.jailbreak(harmful, m)
    sets = sets + ls.PromptSet([dataclasses.replace(p, label=f"jailbreak:{m}") for p in jb])
t = time.time()
acts = ls.collect_residuals(model, sets, batch_size=8, progress=False)
print(f"residuals {tuple(acts.values.shape)} in {time.time() - t:.0f}s", flush=True)

t = time.time()
lens = ls.logit_lens(model, acts, top_k=5)
print(f"lens in {time.time() - t:.0f}s", flush=True)
print("emergence layer (mean refusal > mean positive mass, refusal > 0.01):", lens.emergence_layer())
print("bare comparison (min_mass=0):", lens.emergence_layer(min_mass=0.0))
cm = lens.category_mass()
cm.to_csv(out / "category_mass.csv", index=False)
piv = cm.pivot_table(index="layer", columns=["label", "category"], values="mean")
with __import__("pandas").option_context("display.width", 250, "display.max_columns", 20):
    print(piv[[c for c in piv.columns if c[1] != "neutral"]].round(4).to_string())
cons = lens.consistency(n_top=3)
cons.to_csv(out / "consistency.csv", index=False)
for lab in dict.fromkeys(lens.labels):
    c = cons[cons.label == lab]
    print(f"\n[{lab}] layer: consistency, top tokens (count/{n})")
    for _, r in c.iterrows():
        print(f"  {r.layer:2d}: {r.consistency:.2f} {r.top_tokens}")
t1 = lens.top1_category()
t1.to_csv(out / "top1_category.csv", index=False)
lens.plot("mass").savefig(out / "category_mass.png", dpi=120)
if use_tuned:
    t = time.time()
    tuned = ls.logit_lens(model, acts, top_k=5, lens="tuned")
    print(f"\ntuned lens read-out in {time.time() - t:.0f}s")
    print("tuned lens emergence layer:", tuned.emergence_layer(), "| logit lens:", lens.emergence_layer())
    tcm = tuned.category_mass()
    tcm.to_csv(out / "category_mass_tuned.csv", index=False)
    tpiv = tcm.pivot_table(index="layer", columns=["label", "category"], values="mean")
    with __import__("pandas").option_context("display.width", 250, "display.max_columns", 20):
        print(tpiv[[c for c in tpiv.columns if c[1] != "neutral"]].round(4).to_string())
    tuned.plot("mass").savefig(out / "category_mass_tuned.png", dpi=120)
    tcons = tuned.consistency(n_top=3)
    tcons.to_csv(out / "consistency_tuned.csv", index=False)
    for lab in ("harmful",):
        c = tcons[tcons.label == lab]
        print(f"\n[tuned, {lab}] layer: consistency, top tokens (count/{n})")
        for _, r in c.iterrows():
            print(f"  {r.layer:2d}: {r.consistency:.2f} {r.top_tokens}")
for lab in dict.fromkeys(lens.labels):
    lens.plot("heatmap", label=lab).savefig(out / f"heatmap_{lab.replace(':', '_')}.png", dpi=120)
idx = [0, n, 2 * n, 3 * n]
viz.save_views([viz.lens_topk_view(lens, idx)] + [viz.lens_trajectory_view(lens, i) for i in idx],
               out / "lens_views.html", title="Logit lens, default model",
               captions=["top-5 lens tokens per layer"] + [f"top-1 per layer, prompt {i} ({lens.labels[i]})"
                                                           for i in idx])

t = time.time()
donor = acts.subset([i for i, lab in enumerate(acts.labels) if lab == "harmless"])
# Graft only where there is a refusal to remove: the harmful prompts the model refuses (judge).
base = ls.refusal.generate(model, harmful, max_new_tokens=24, batch_size=16, progress=False)
refused = ls.PromptSet([p for p, r in zip(harmful, ls.refusal.judge(base)) if r][:12], name="refused")
n_refused = sum(ls.refusal.judge(base))
print(f"\nbaseline: {n_refused}/{len(harmful)} harmful prompts refused; grafting {len(refused)} "
      f"({time.time() - t:.0f}s)", flush=True)
t = time.time()
g = ls.graft(model, refused, donor, generate=False, batch_size=16)
print(f"graft scores (all layers) in {time.time() - t:.0f}s", flush=True)
f = g.to_frame()
f.to_csv(out / "graft_scores.csv", index=False)
print(f[["layer", "score_before", "score", "delta", "delta_ci_low", "delta_ci_high"]].round(3).to_string())
best = g.best_layer()
print("best graft layer (largest mean refusal drop; the final layer is not grafted):", best)
g.plot().savefig(out / "graft.png", dpi=120)
t = time.time()
gl = sorted({best, 12, 18})
gg = ls.graft(model, refused, donor, layers=gl, generate=True, max_new_tokens=32, batch_size=16)
print(f"graft + generation at {gl} in {time.time() - t:.0f}s", flush=True)
fg = gg.to_frame()
fg.to_csv(out / "graft_generation.csv", index=False)
print(fg.round(3).to_string())
print("summary:", gg.summary())
for layer in [None] + gl:
    print(f"-- layer {layer}: first 4 completions")
    for c in gg.completions[layer][:4]:
        print("   ", repr(c[:100]))
print(f"total {time.time() - t0:.0f}s")
