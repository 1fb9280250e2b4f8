"""Data-parallel capture and refusal generation under accelerate (two CPU processes, gloo), the
split/gather helpers, `capture_command` (what `lens-safety capture` runs) and the GPU check's no-CUDA path.

The launched processes share one stdout, so their prints can interleave: each process reports
through a file of its own (``rank-<i>.json``), and the tests read those."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lens_safety as ls
from lens_safety import parallel
from lens_safety.activations import capture_command, parse_device_map
from lens_safety.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"prompt number {i} " + "word " * (i % 7) for i in range(13)]

SCRIPT = """
import json, sys, torch
from pathlib import Path
import lens_safety as ls
from lens_safety import parallel
from lens_safety.activations import capture_command

cache, out_pt, out_dir, prompts_file = sys.argv[1:5]
model = ls.testing.tiny_model(seed=0)
prompts = [line for line in open(prompts_file).read().splitlines() if line]
cached = ls.collect_residuals(model, prompts, cache=cache, progress=False, batch_size=2, positions=2)
in_memory = ls.collect_residuals(model, prompts, cache=False, progress=False, batch_size=2, positions=2)
capture_command([prompts_file], out_dir, model=model, cache=False, batch_size=2, progress=False)
assert torch.equal(cached.values, in_memory.values), "cached and in-memory runs differ"
rank = parallel.process_index()
report = {"rank": rank, "of": parallel.num_processes(), "rows": cached.values.shape[0]}
(Path(out_pt).parent / f"rank-{rank}.json").write_text(json.dumps(report))
if parallel.is_main():
    torch.save({"cached": cached.values, "in_memory": in_memory.values}, out_pt)
"""


# A deterministic judge with all three outcomes (a random tiny model's replies mean nothing); the
# salt "4" makes the tiny model's replies give kept and dropped pairs.
JUDGE = """
import zlib
from lens_safety.judges import OUTCOMES, Judge, JudgedReply

class HashJudge(Judge):
    name = "crc32"

    def verdicts(self, completions, requests=None):
        return [JudgedReply(OUTCOMES[zlib.crc32(("4" + t).encode()) % 3], "crc32") for t in completions]
"""

GEN_SCRIPT = JUDGE + """
import json, sys
from pathlib import Path
import lens_safety as ls
from lens_safety import parallel, refusal as R

cache, out_dir, prompts_file = sys.argv[1:4]
rank = parallel.process_index()
log = {"generated": [], "saved": 0}
run, save = R._run_generation, R.RefusalResult.save

def counting_run(model, ps, **kw):
    log["generated"].append(len(ps))
    return run(model, ps, **kw)

def counting_save(self, directory):
    log["saved"] += 1
    return save(self, directory)

R._run_generation, R.RefusalResult.save = counting_run, counting_save
model = ls.testing.tiny_model(seed=0)
prompts = [line for line in open(prompts_file).read().splitlines() if line]
kw = dict(max_new_tokens=4, batch_size=2, progress=False, judge=HashJudge(), cache=cache)
methods = ["prefix_injection", "refusal_suppression"]
res = ls.evaluate_refusal(model, prompts, **kw)
pairs = ls.jailbreak_pairs(model, prompts, methods, min_gap=-1e9, **kw)
n_first = len(log["generated"])
again = ls.evaluate_refusal(model, prompts, **kw)
pairs_again = ls.jailbreak_pairs(model, prompts, methods, min_gap=-1e9, **kw)
report = {"rank": rank, "of": parallel.num_processes(), "generated": log["generated"][:n_first],
          "generated_again": log["generated"][n_first:], "saved": log["saved"],
          "result": res.to_frame().to_json(orient="split", double_precision=15),
          "again": again.to_frame().to_json(orient="split", double_precision=15),
          "pairs": pairs.to_frame().to_json(orient="split", double_precision=15),
          "pairs_again": pairs_again.to_frame().to_json(orient="split", double_precision=15),
          "dropped": pairs.dropped.to_json(orient="split", double_precision=15)}
Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(report))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(tmp_path: Path, source: str, *args) -> list[dict]:
    """Run ``source`` as two processes under ``accelerate launch``; each process's ``rank-<i>.json``
    in ``tmp_path`` (written by the script itself), in rank order."""
    script = tmp_path / "run.py"
    script.write_text(source)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               LENS_SAFETY_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))
    # Without CUDA, --multi_gpu runs torchrun; lens_safety.parallel joins the processes with gloo.
    # (`accelerate launch --cpu --num_processes 2` would start a single process.)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank-{i}.json").read_text()) for i in range(2)]
    assert [(r["rank"], r["of"]) for r in reports] == [(0, 2), (1, 2)]
    return reports


def test_shard_bounds_cover_every_item_once():
    for n in range(0, 12):
        for n_proc in (1, 2, 3, 5):
            bounds = [parallel.shard_bounds(n, n_proc, i) for i in range(n_proc)]
            assert [i for a, b in bounds for i in range(a, b)] == list(range(n))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    # one process: split is everything, gather/broadcast are identities
    idx, mine = parallel.split(["a", "b"])
    assert (idx, mine, parallel.gather(mine), parallel.broadcast(7)) == ([0, 1], ["a", "b"], ["a", "b"], 7)
    assert parallel.state() is None and parallel.is_main()


@pytest.mark.slow
def test_two_process_capture_identical_to_single_process(tiny, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    reports = _launch_two(tmp_path, SCRIPT, tmp_path / "cache2", tmp_path / "two.pt", tmp_path / "out2",
                          prompts_file)
    assert [r["rows"] for r in reports] == [len(PROMPTS)] * 2  # every process got every row

    single = ls.collect_residuals(tiny, PROMPTS, cache=tmp_path / "cache1", progress=False, batch_size=2,
                                  positions=2)
    two = torch.load(tmp_path / "two.pt")
    assert torch.equal(two["cached"], single.values) and torch.equal(two["in_memory"], single.values)
    # one verified cache entry, byte for byte the single-process one
    (e1,), (e2,) = list((tmp_path / "cache1").iterdir()), list((tmp_path / "cache2").iterdir())
    assert e1.name == e2.name
    for f in ("values.safetensors", "meta.json"):
        assert (e1 / f).read_bytes() == (e2 / f).read_bytes()
    out = ls.Residuals.load(tmp_path / "out2")  # capture_command under two processes
    stripped = [p.strip() for p in PROMPTS]  # a .txt file holds one stripped prompt a line
    ref = ls.collect_residuals(tiny, stripped, cache=False, progress=False, batch_size=2)
    assert torch.equal(out.values, ref.values) and out.prompts.texts == stripped


@pytest.mark.slow
def test_two_process_refusal_and_pairs_identical_to_single_process(tiny, tmp_path, monkeypatch):
    """evaluate_refusal / jailbreak_pairs under two processes: each generates its share of the
    batches, both return the one-process result, only the main process writes the cache, and a
    second run generates nothing."""
    from lens_safety import refusal as R

    prompts = PROMPTS[:11]  # batch_size 2: six batches, the last one half full
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    (tmp_path / "out").mkdir()
    reports = _launch_two(tmp_path / "out", GEN_SCRIPT, tmp_path / "cache2", tmp_path / "out", prompts_file)

    ns: dict = {}
    exec(JUDGE, ns)
    generated, saved = [], []
    run, save = R._run_generation, R.RefusalResult.save
    monkeypatch.setattr(R, "_run_generation", lambda model, ps, **kw: generated.append(len(ps)) or run(model, ps, **kw))
    monkeypatch.setattr(R.RefusalResult, "save", lambda self, d: saved.append(d) or save(self, d))
    kw = dict(max_new_tokens=4, batch_size=2, progress=False, judge=ns["HashJudge"](), cache=tmp_path / "cache1")
    res = ls.evaluate_refusal(tiny, prompts, **kw)
    pairs = ls.jailbreak_pairs(tiny, prompts, ["prefix_injection", "refusal_suppression"], min_gap=-1e9, **kw)
    assert len(set(res.outcomes)) == 3 and len(pairs) >= 1 and len(pairs.dropped) >= 1  # a test with teeth

    def js(frame) -> str:
        return frame.to_json(orient="split", double_precision=15)

    for r in reports:  # every process holds the full one-process result, in input order
        assert r["result"] == r["again"] == js(res.to_frame())
        assert r["pairs"] == r["pairs_again"] == js(pairs.to_frame())
        assert r["dropped"] == js(pairs.dropped)
        assert r["generated_again"] == []  # the second run is served from the cache
    # the processes split the generation: together exactly the one-process rows, neither all of them
    shares = [sum(r["generated"]) for r in reports]
    assert sum(shares) == sum(generated) and 0 < min(shares) and max(shares) < sum(generated)
    # one process wrote the cache, entry for entry the one-process cache
    assert reports[1]["saved"] == 0 and reports[0]["saved"] == len(saved) == 4
    e1, e2 = sorted((tmp_path / "cache1").iterdir()), sorted((tmp_path / "cache2").iterdir())
    assert [e.name for e in e1] == [e.name for e in e2]
    for a, b in zip(e1, e2):
        assert sorted(f.name for f in a.iterdir()) == sorted(f.name for f in b.iterdir())
        for f in a.iterdir():
            assert f.read_bytes() == (b / f.name).read_bytes(), f


def test_capture_command_writes_a_loadable_folder(tiny, tmp_path):
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in
                               [("Bake bread", "harmless"), ("Make a bomb", "harmful")]) + "\n")
    txt = tmp_path / "more.txt"
    txt.write_text("Hi there\n\nList three rivers\n")
    acts = capture_command([str(jsonl), str(txt)], tmp_path / "out", model=tiny, cache=False, progress=False,
                           positions=2, n=5)
    back = ls.Residuals.load(tmp_path / "out")
    assert torch.equal(back.values, acts.values) and back.values.shape == (4, tiny.n_layers + 1, 2, tiny.d_model)
    assert back.prompts.texts == ["Bake bread", "Make a bomb", "Hi there", "List three rivers"]
    assert back.labels == ["harmless", "harmful", "more", "more"]
    ref = ls.collect_residuals(tiny, back.prompts.texts, cache=False, progress=False, positions=2)
    assert torch.equal(back.values, ref.values)
    # n keeps the first n of each source
    two = capture_command([str(jsonl), str(txt)], tmp_path / "out_n", model=tiny, cache=False, progress=False, n=1)
    assert two.prompts.texts == ["Bake bread", "Hi there"]


@pytest.mark.parametrize("kwargs, match", [
    ({"prompts": []}, "at least one"),
    ({"prompts": "missing.txt"}, "does not exist"),
    ({"batch_size": 0}, "batch size"),
    ({"n": 0}, "positive int"),
    ({"positions": "first"}, "positions"),
    ({"dtype": "int8"}, "Unknown dtype"),
    ({"device_map": "everywhere"}, "--device-map"),
])
def test_capture_command_validates_before_loading(tmp_path, monkeypatch, kwargs, match):
    import lens_safety.capture

    monkeypatch.setattr(lens_safety.capture, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    args = {"prompts": ["harmless"], "out": tmp_path / "o", **kwargs}
    with pytest.raises(InputError, match=match):
        capture_command(args.pop("prompts"), args.pop("out"), **args)


def test_capture_command_refuses_a_foreign_out_folder(tiny, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a residuals folder"):
        capture_command(["Hi"], tmp_path / "o", model=tiny, cache=False, progress=False)


def test_parse_device_map():
    assert parse_device_map('{"model.layers.0": 0, "lm_head": "cpu"}') == {"model.layers.0": 0, "lm_head": "cpu"}
    assert parse_device_map("balanced_low_0") == "balanced_low_0" and parse_device_map(None) is None
    with pytest.raises(InputError, match="JSON"):
        parse_device_map("{oops")


def test_gpu_check_exits_cleanly_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["cuda"] is False and "no CUDA device" in row["message"]


@pytest.mark.slow
def test_gpu_check_dry_run_exercises_every_stage():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--n", "4",
                           "--gen", "2", "--pairs", "2"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    stages = {(r["stage"], r["config"]): r for r in rows if "stage" in r}
    for stage in ("capture", "lens", "generation", "patching"):
        for config in ("cpu-float32", "cpu-bfloat16"):
            assert "error" not in stages[(stage, config)], stages[(stage, config)]
    bf16 = stages[("capture", "cpu-bfloat16")]
    assert bf16["stored_dtype"] == "torch.float32" and 1e-5 < bf16["max_rel_err"] < 2e-2
