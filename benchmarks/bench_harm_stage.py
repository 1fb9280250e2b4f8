"""Time the harm-vs-refusal stage at the settings of a default (full) run on the default model, beside a
bare forward pass over the same prompts, and write ``benchmarks/results/harm_stage.json``.

    python benchmarks/bench_harm_stage.py            # about 10 minutes on 2 CPU cores

The stage runs alone (no refusal, pairs or directions results: the refusal direction is read at the last
template token and the judge is not compared), with a fresh cache, so the time is what ``--harm`` adds.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

import lens_safety as ls
from lens_safety.pipeline import stages as S
from lens_safety.pipeline.config import make_config, sample_sets
from lens_safety.pipeline.stage import Context

OUT = Path(__file__).resolve().parent / "results" / "harm_stage.json"


def bare_forward_seconds(model, prompts: ls.PromptSet, batch_size: int) -> float:
    """One plain forward (no hooks, no caching) over the prompts, batched like the capture."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            enc = model.tokenize(list(prompts.texts[i:i + batch_size]))
            model.bridge(enc["input_ids"], attention_mask=enc["attention_mask"])
    return time.perf_counter() - t0


def main() -> None:
    with tempfile.TemporaryDirectory() as home:
        os.environ["LENS_SAFETY_HOME"] = home  # a cold cache: what a first --harm run costs
        for sub in ("assets", "models"):  # the model itself stays cached
            src = Path.home() / ".cache" / "lens_safety" / sub
            if src.exists():
                os.symlink(src, Path(home) / sub)
        model = ls.load_model()
        cfg = make_config(False, None, None, 16, 0, harm=True)
        sets = sample_sets(cfg)
        ctx = Context(model, cfg, sets, out=Path(home), progress=False, results={}, stage=S.harm.STAGE)
        groups = S.harm.jailbreak_groups(ctx)
        harmful, harmless = S.harm.direction_sets(groups, 200, cfg.seed)
        t0 = time.perf_counter()
        result = S.harm.STAGE.run(ctx)
        stage_s = time.perf_counter() - t0
        captured = ls.PromptSet([*harmful, *harmless, *(p for g in groups.values() for p in g)])
        bare_s = bare_forward_seconds(model, captured, cfg.batch_size)
    doc = {"stage_s": stage_s, "bare_forward_s": bare_s, "ratio": stage_s / bare_s, "n_captured": len(captured),
           "jailbreaks": list(cfg.jailbreaks), "n_eval": cfg.n_eval, "skipped": result.skipped,
           "torch_threads": torch.get_num_threads(), "machine": os.uname().machine}
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
