"""What recording the residual stream along replies costs: time and memory of ``record_generation`` beside
plain generation of the same prompts, in one run, on the default model; writes
``benchmarks/results/recording.json``.

    python benchmarks/bench_recording.py            # about 6 minutes on 2 CPU cores

* time: plain generation (``run_generation``, no hooks) and recording (the ``--reply`` spec: 4 layers,
  float16, step 0 + every reply token; and the widest spec: every layer, every prompt position, float32),
  alternated over ``REPEATS`` rounds on the same batches; the median of each, and the ratio.
* tokens: the recorded replies equal the plain ones (asserted).
* memory: peak resident memory (sampled every 20 ms from /proc) of each run above the process' baseline,
  beside the size of one batch's shard and of the whole recording on disk: the recording writes each batch
  as it finishes, so the peak follows one batch, not the run.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

import lens_safety as ls
from lens_safety.analyses.reply import reply_record_spec
from lens_safety.model.generation import run_generation
from lens_safety.model.recording import RecordSpec, record_generation

OUT = Path(__file__).resolve().parent / "results" / "recording.json"
N_PROMPTS, BATCH, NEW_TOKENS, REPEATS = 48, 16, 48, 3


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak resident memory while the block runs (a sampling thread)."""

    def __enter__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self.start = self.peak

        def sample():
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, rss_bytes())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    torch.manual_seed(0)
    model = ls.load_model()
    harmful = ls.load_prompts("harmbench").sample(N_PROMPTS // 2, seed=1)
    jb = ls.jailbreak(harmful, "refusal_suppression")
    prompts = ls.PromptSet([*harmful, *jb], "bench")
    specs = {"run spec (4 layers, fp16, step 0 + reply)": reply_record_spec(model),
             "widest (all layers and prompt positions, fp32)": RecordSpec(tuple(range(model.n_layers + 1)))}
    kw = {"max_new_tokens": NEW_TOKENS, "batch_size": BATCH, "system": None, "chat": None, "progress": False}
    times: dict[str, list[float]] = {"plain": [], **{k: [] for k in specs}}
    peaks: dict[str, int] = {}
    sizes: dict[str, dict[str, int]] = {}
    plain_tokens = None
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(REPEATS):
            with PeakRss() as m:
                t0 = time.perf_counter()
                _, _, plain_tokens = run_generation(model, prompts, **kw)
                times["plain"].append(time.perf_counter() - t0)
            peaks["plain"] = max(peaks.get("plain", 0), m.peak - m.start)
            for name, spec in specs.items():
                folder = Path(tmp) / f"{len(sizes)}_{r}"
                with PeakRss() as m:
                    t0 = time.perf_counter()
                    rec = record_generation(model, prompts, record=spec, cache=folder, **kw)
                    times[name].append(time.perf_counter() - t0)
                peaks[name] = max(peaks.get(name, 0), m.peak - m.start)
                assert rec.reply_ids == plain_tokens, f"{name}: recorded tokens differ from plain generation"
                entry = next(p for p in folder.iterdir() if p.is_dir())
                shards = sorted(entry.glob("batch_*.safetensors"))
                sizes[name] = {"total_bytes": folder_bytes(entry), "largest_batch_bytes": max(s.stat().st_size
                                                                                              for s in shards),
                               "n_batches": len(shards)}
                del rec
    plain = statistics.median(times["plain"])
    doc = {"model": model.name, "n_prompts": len(prompts), "batch_size": BATCH, "max_new_tokens": NEW_TOKENS,
           "repeats": REPEATS, "torch_threads": torch.get_num_threads(), "machine": os.uname().machine,
           "plain_s": plain, "plain_s_all": times["plain"], "reply_tokens": sum(len(t) for t in plain_tokens),
           "tokens_equal": True, "peak_rss_plain_bytes": peaks["plain"],
           "recording": {name: {"median_s": statistics.median(times[name]), "all_s": times[name],
                                "overhead": statistics.median(times[name]) / plain - 1,
                                "peak_rss_above_start_bytes": peaks[name], **sizes[name],
                                "layers": list(spec.layers), "prompt_positions": spec.prompt_positions,
                                "dtype": spec.dtype}
                         for name, spec in specs.items()}}
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
