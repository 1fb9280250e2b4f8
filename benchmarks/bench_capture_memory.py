"""Peak memory of residual capture as the number of prompts grows (it should stay flat).

    python benchmarks/bench_capture_memory.py                 # N = 200, 2000, 10000
    python benchmarks/bench_capture_memory.py --sizes 200 2000
    python benchmarks/bench_capture_memory.py --tiny --sizes 200 2000 10000   # pipeline only

Each N runs in its own subprocess on the default model (float32, CPU) with short raw prompts
(no chat template, ~10 tokens), ``positions="last"``, batches of 64, the disk cache in a
temporary folder and ``mmap=True`` (the result is memory-mapped from the cache, not read into
RAM). It prints one JSON row per N:

- ``model_rss_mb``: resident memory after loading the model and one warm-up batch (the baseline);
- ``peak_rss_mb`` / ``capture_growth_mb``: peak resident memory during capture and assembly,
  and its growth over the baseline — flat in N when batches stream to disk;
- ``values_mb``: size of the output itself (N x 25 x 896 float32);
- ``in_ram_peak_rss_mb``: peak after also loading the result into RAM
  (``Residuals.load(dir)``, mmap off): grows by the output size, as it must;
- ``seconds`` and ``prompts_per_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(n: int, batch_size: int, tiny: bool = False) -> dict:
    import torch

    import lens_safety as ls

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 2))
    model = ls.testing.tiny_model(n_layers=24, d_model=64) if tiny else ls.load_model(check=False)
    colours = ["red", "green", "blue", "amber", "violet", "teal", "ochre", "grey"]
    prompts = [f"Item {i}: name a {colours[i % 8]} fruit." for i in range(n)]
    # Warm up: the first forward pages in the weights (memory-mapped safetensors) and sets up
    # the allocator; the baseline is taken after it.
    ls.collect_residuals(model, prompts[:batch_size], positions="last", batch_size=batch_size, chat=False,
                         cache=False, progress=False)
    model_rss, model_peak = _rss_mb(), _peak_mb()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        acts = ls.collect_residuals(model, prompts, positions="last", batch_size=batch_size, chat=False,
                                    cache=tmp, progress=False, mmap=True)
        secs = time.perf_counter() - t0
        peak = _peak_mb()
        checksum = float(acts.values[:, -1].sum())  # touch the mapped values
        values_mb = acts.values.numel() * 4 / 2**20
        (entry,) = [p for p in os.scandir(tmp) if p.is_dir()]
        in_ram = ls.Residuals.load(entry.path)
        in_ram_peak = _peak_mb()
        assert float(in_ram.values[:, -1].sum()) == checksum
    return {"n": n, "model": model.name, "batch_size": batch_size, "seconds": round(secs, 1),
            "prompts_per_s": round(n / secs, 1),
            "model_rss_mb": round(model_rss, 1), "model_peak_rss_mb": round(model_peak, 1),
            "peak_rss_mb": round(peak, 1), "capture_growth_mb": round(peak - model_peak, 1),
            "values_mb": round(values_mb, 1), "in_ram_peak_rss_mb": round(in_ram_peak, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 2000, 10000])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="a tiny random 24-layer model (d_model 64) instead of the "
                    "default model: the same pipeline in seconds, to check flatness up to large N")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(args.child, args.batch_size, args.tiny)), flush=True)
        return 0
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--batch-size", str(args.batch_size)]
                             + (["--tiny"] if args.tiny else []), capture_output=True, text=True)
        if out.returncode != 0:
            print(json.dumps({"n": n, "error": out.stderr.strip().splitlines()[-1:]}), flush=True)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) > 1:
        growth = [r["capture_growth_mb"] for r in rows]
        print(json.dumps({"summary": True, "sizes": [r["n"] for r in rows], "capture_growth_mb": growth,
                          "values_mb": [r["values_mb"] for r in rows],
                          "growth_range_mb": round(max(growth) - min(growth), 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
