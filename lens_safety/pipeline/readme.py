"""The README's measured block, generated from a run's ``metrics.json``, and the small formatters the report
shares with it.

``python -m lens_safety.pipeline.readme OUT/metrics.json README.md`` writes the block between the README's
``<!-- metrics:begin -->`` / ``<!-- metrics:end -->`` markers (``--check``: exit 1 when it is out of date).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from ..core.store import read_json
from .config import DEFAULT_N
from .verdicts import is_missing

__all__ = ["readme_table", "harm_table", "reply_table", "update_readme", "fmt", "ci_text", "graft_earliest_text",
           "main"]


def fmt(x: Any, digits: int = 2) -> str:
    if is_missing(x):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


README_BEGIN, README_END = "<!-- metrics:begin -->", "<!-- metrics:end -->"


def ci_text(lo: Any, hi: Any, digits: int = 3) -> str:
    if is_missing(lo) or is_missing(hi):
        return ""
    if isinstance(lo, float) or isinstance(hi, float):
        return f" (CI {lo:.{digits}f}-{hi:.{digits}f})"
    return f" (CI {lo}-{hi})"


def graft_earliest_text(ec: dict[str, Any]) -> str:
    """The earliest grafted layer (final excluded) where most refused requests comply, with the Wilson CI.

    >>> graft_earliest_text({"layer": 12, "n_flipped": 9, "n_refused": 12, "frac": 0.75, "ci_low": 0.468,
    ...                       "ci_high": 0.911})
    '12 (9 of 12 complied: 0.75, CI 0.47-0.91)'
    >>> graft_earliest_text({"layer": None, "n_flipped": 2, "n_refused": 12, "frac": 1 / 6, "ci_low": 0.047,
    ...                       "ci_high": 0.448, "most_flips_layer": 16})
    'none (most at layer 16: 2 of 12 complied: 0.17, CI 0.05-0.45)'
    """
    if not ec:
        return "n/a"
    lo, hi = ec.get("ci_low"), ec.get("ci_high")
    ci = "" if is_missing(lo) or is_missing(hi) else f", CI {lo:.2f}-{hi:.2f}"
    counts = f"{ec.get('n_flipped')} of {ec.get('n_refused')} complied: {fmt(ec.get('frac'))}{ci}"
    if ec.get("layer") is not None:
        return f"{ec['layer']} ({counts})"
    if ec.get("most_flips_layer") is None:
        return "none"
    return f"none (most at layer {ec['most_flips_layer']}: {counts})"


def readme_table(metrics: dict[str, Any]) -> str:
    """The README's "measured" block (Markdown) rendered from a run's ``metrics.json`` dict.

    >>> print(readme_table({"headline": {"model": "m", "refusal_rate": {"harmbench": 0.5},
    ...                                  "rates_ci": {"harmbench": {"refusal": [0.3, 0.7]}}}, "verdicts": {},
    ...                     "config": {"quick": False, "n": None, "n_eval": 24}}).splitlines()[4])
    | refusal rate (judged refused) | harmbench 0.500 (CI 0.300-0.700) |
    """
    h = metrics.get("headline", {})
    cfg = metrics.get("config", {})
    rows: list[tuple[str, str]] = []
    rates_ci = h.get("rates_ci") or {}
    for key, label, ci_key in (("refusal_rate", "refusal rate (judged refused)", "refusal"),
                               ("compliance_rate", "compliance rate (judged complied)", "compliance"),
                               ("unengaged_rate", "unengaged rate (no answer at all)", "unengaged")):
        if h.get(key):
            cis = {k: (rates_ci.get(k) or {}).get(ci_key) or [None, None] for k in h[key]}
            rows.append((label, ", ".join(f"{k} {v:.3f}" + ci_text(*cis[k]) for k, v in h[key].items()
                                          if not is_missing(v))))
    if h.get("attack_success_rate"):
        asr_ci = h.get("attack_success_rate_ci") or {}
        rows.append(("attack success rate (complied, of requests refused plain)",
                     ", ".join(f"{k} {v:.2f}" + ci_text(*(asr_ci.get(k) or [None, None]), digits=2)
                               for k, v in h["attack_success_rate"].items() if not is_missing(v))))
    if h.get("n_effective_pairs") is not None:
        dropped = h.get("n_dropped_pairs")
        rows.append(("effective jailbreak pairs", str(h["n_effective_pairs"])
                     + ("" if dropped is None else f" ({dropped} candidates dropped)")))
    if h.get("judge_agreement"):
        rows.append(("judge agreement", ", ".join(f"{k.replace('~', ' vs ')} {v:.2f}"
                                                  for k, v in h["judge_agreement"].items())))
    best = h.get("probe_best")
    if best:
        rows.append(("2-way probe, best layer", f"{best['layer']}: {best['accuracy']:.3f}"
                     + ci_text(best.get("ci_low"), best.get("ci_high"))))
    first = h.get("probe_first_layer_095")
    ci = h.get("probe_first_layer_095_ci") or [None, None]
    if "probe_first_layer_095" in h:
        rows.append(("2-way probe, first layer >= 0.95", "never" if first is None else f"{first}{ci_text(*ci)}"))
    gbest = h.get("probe_best_generic")
    if gbest:
        rows.append(("2-way probe vs generic harmless, best layer", f"{gbest['layer']}: {gbest['accuracy']:.3f}"
                     + ci_text(gbest.get("ci_low"), gbest.get("ci_high"))))
        g1 = h.get("probe_first_layer_095_generic")
        rows.append(("2-way probe vs generic harmless, first layer >= 0.95", "never" if g1 is None else str(g1)))
    if h.get("probe_layer0_accuracy") is not None:
        rows.append(("2-way probe, layer 0 (embedding)", f"{h['probe_layer0_accuracy']:.3f}"))
    if h.get("emergence_layer"):
        rows.append(("lens: refusal emerges at layer", ", ".join(
            f"{k} {'never' if is_missing(v) else v}" for k, v in h["emergence_layer"].items())))
    if h.get("emergence_layer_tuned"):
        rows.append(("tuned lens: refusal emerges at layer", ", ".join(
            f"{k} {'never' if is_missing(v) else v}" for k, v in h["emergence_layer_tuned"].items())))
    for key, b in (h.get("break_layers_ci") or {}).items():
        rows.append((f"break layer {key}",
                     "none" if b is None else f"{b['layer']}{ci_text(b['ci_low'], b['ci_high'])}"))
    if h.get("graft_best_layer") is not None:
        # runs (or cached graft stages) from before the earliest-compliance layer counted the final layer
        where = "a non-final layer" if h.get("graft_earliest_compliance") else "any layer, the final one included"
        rows.append(("grafting: largest refusal drop", f"layer {h['graft_best_layer']} "
                     f"(at most {h.get('graft_max_complied')} of {h.get('graft_n_prompts')} complied at {where})"))
    if h.get("graft_earliest_compliance"):
        rows.append(("grafting: earliest layer where most refused requests comply",
                     graft_earliest_text(h["graft_earliest_compliance"])))
    d = h.get("direction")
    if d:
        def rate(*keys, sep=" -> "):
            return sep.join("n/a" if is_missing(d.get(k)) else
                            f"{d[k]:.3f}" + ci_text(*(d.get(f"{k}_ci") or [None] * 2)) for k in keys)

        rows.append(("refusal direction (layer, position)", f"{d['layer']}, {d['position']} "
                     f"(best of {d.get('n_candidates')} candidates"
                     + ("" if d.get("filters_passed", True) else "; no candidate passed every filter") + ")"))
        rows.append((f"harmbench refusal: plain -> direction ablated (n={d.get('n_eval_harmful')})",
                     rate("harmful_refusal_plain", "harmful_refusal_ablated")
                     + ("" if is_missing(d.get("harmful_refusal_orthogonalized")) else
                        f" (orthogonalised weights: {d['harmful_refusal_orthogonalized']:.3f})")))
        if not is_missing(d.get("harmful_compliance_ablated")):
            rows.append(("harmbench, direction ablated: compliance / unengaged",
                         rate("harmful_compliance_ablated", "harmful_unengaged_ablated", sep=" / ")))
        rows.append(("harmless next-token KL, direction ablated", rate("harmless_kl_ablated")))
        rows.append((f"harmless refusal: plain -> direction added x{d.get('addition_coeff'):g} "
                     f"(n={d.get('n_eval_harmless')})", rate("harmless_refusal_plain", "harmless_refusal_added")))
        if not is_missing(d.get("borderline_refusal_plain")):
            rows.append(("borderline refusal: plain -> direction added",
                         rate("borderline_refusal_plain", "borderline_refusal_added")))
    for key, v in (metrics.get("verdicts") or {}).items():
        rows.append((f"verdict {key.replace('_', ' ')}", v["status"]))
    run = "quick" if cfg.get("quick") else "full"
    lines = [f"Model `{h.get('model')}`, {run} run (prompts per set: {cfg.get('n') or DEFAULT_N}, "
             f"generation per set: {cfg.get('n_eval')}, reply tokens: {cfg.get('max_new_tokens', 24)}):", "",
             "| measure | value |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines) + "\n"


def _verdict_rows(metrics: dict[str, Any], keys: tuple[str, ...]) -> list[tuple[str, str]]:
    verdicts = metrics.get("verdicts") or {}
    return [(f"verdict {k.replace('_', ' ')}", verdicts[k]["status"]) for k in keys if verdicts.get(k)]


def _block(metrics: dict[str, Any], detail: str, rows: list[tuple[str, str]]) -> str:
    """A generated README block: the run's model and kind, then a two-column Markdown table."""
    cfg = metrics.get("config", {})
    lines = [f"Model `{metrics['headline'].get('model')}`, {'quick' if cfg.get('quick') else 'full'} run "
             f"(jailbreaks: {', '.join(cfg.get('jailbreaks') or [])}; {detail}):", "",
             "| measure | value |", "|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} |" for a, b in rows]) + "\n"


def harm_table(metrics: dict[str, Any]) -> str:
    """The README's harm-vs-refusal block (Markdown) from the ``metrics.json`` of a run with ``--harm``.

    >>> print(harm_table({"headline": {"model": "m", "harm": {"harm_layer": 20, "harm_auroc": 0.9,
    ...     "refusal_layer": 22, "refusal_position": -1, "refusal_auroc": 0.8, "cosine_at_harm_layer": 0.3,
    ...     "cosine_at_refusal_layer": 0.5}}, "verdicts": {}, "config": {"n_eval": 16}}).splitlines()[4])
    | harm direction: layer, held-out AUROC | 20, 0.900 |
    """
    h = (metrics.get("headline") or {}).get("harm") or {}
    if not h:
        return "No harm-vs-refusal stage in this run (`lens-safety run --harm`).\n"
    rows = [("harm direction: layer, held-out AUROC", f"{h['harm_layer']}, {h['harm_auroc']:.3f}"),
            ("refusal direction: layer, template position, held-out AUROC",
             f"{h['refusal_layer']}, {h['refusal_position']}, {h['refusal_auroc']:.3f}"),
            ("cosine(harm, refusal) at the harm / refusal layer",
             f"{h['cosine_at_harm_layer']:.2f} / {h['cosine_at_refusal_layer']:.2f}")]
    for key, (frac, lo, hi) in (h.get("gap_fraction") or {}).items():
        group, direction = key.rsplit("/", 1)
        rows.append((f"{group}: {direction} gap fraction", f"{fmt(frac)}{ci_text(lo, hi, digits=2)}"))
    for key, g in (h.get("guard") or {}).items():
        group, detector = key.rsplit("/", 1)
        auroc = "" if g.get("auroc") is None else f"AUROC {fmt(g['auroc'], 3)}, "
        rows.append((f"guard, {detector}: {group}", f"{auroc}TPR at {g['fpr']:.0%} FPR {fmt(g['tpr'])}"))
    for key, d in (h.get("steering") or {}).items():
        (j, jl, jh), (r, rl, rh) = d["judgement"], d["refusal"]
        rows.append((f"steering {key}: harm judgement / refusal score",
                     f"{fmt(j)}{ci_text(jl, jh, digits=2)} / {fmt(r)}{ci_text(rl, rh, digits=2)}"))
    j = h.get("judgement") or {}
    if j:
        rows.append(("the model's own yes/no judgement, harmful vs harmless AUROC", fmt(j.get("judgement_auroc"), 3)))
    o = h.get("orthogonalized") or {}
    if o:
        rows.append(("refusal direction orthogonalised: harm AUROC / harmful first-token refusal",
                     f"{fmt(o.get('harm_auroc_plain'), 3)} -> {fmt(o.get('harm_auroc_orthogonalized'), 3)} / "
                     f"{fmt(o.get('harmful_refusal_plain'))} -> {fmt(o.get('harmful_refusal_orthogonalized'))}"))
    f = h.get("false_refusal") or {}
    if f:
        rows.append(("targeted false-refusal fix: borderline / harmful first-token refusal, harmless KL",
                     f"{fmt(f.get('borderline_refusal_plain'))} -> {fmt(f.get('borderline_refusal_targeted'))} / "
                     f"{fmt(f.get('harmful_refusal_plain'))} -> {fmt(f.get('harmful_refusal_targeted'))}, "
                     f"KL {fmt(f.get('harmless_kl_targeted'), 3)}"))
    rows += _verdict_rows(metrics, ("harm_vs_refusal", "harm_steering", "latent_guard"))
    return _block(metrics, f"steering on {metrics.get('config', {}).get('n_eval')} prompts per set", rows)


def reply_table(metrics: dict[str, Any]) -> str:
    """The README's along-the-reply block (Markdown) from the ``metrics.json`` of a run with ``--reply``.

    >>> print(reply_table({"headline": {"model": "m", "reply": {"n_replies": 4, "layers": [1, 2], "early_tokens": 24,
    ...     "turns": {"all": {"n": 4, "turned": 1, "complied_then_refused": 1, "refused_then_complied": 0,
    ...                       "median_turn_at": 16, "early24_agreement": 0.75, "agreement_ci": [0.3, 0.95]}},
    ...     "detection": {}, "compliance": {}, "fpr": 0.05}}, "verdicts": {}, "config": {}}).splitlines()[4])
    | all: replies that turn (complied -> refused / refused -> complied), median turn | 1 of 4 (1 / 0), at token 16 |
    """
    r = (metrics.get("headline") or {}).get("reply") or {}
    if not r:
        return "No along-the-reply stage in this run (`lens-safety run --reply`).\n"
    early = r["early_tokens"]
    rows = []
    for group, t in r["turns"].items():
        at = "" if is_missing(t.get("median_turn_at")) else f", at token {t['median_turn_at']:g}"
        rows.append((f"{group}: replies that turn (complied -> refused / refused -> complied), median turn",
                     f"{t['turned']} of {t['n']} ({t['complied_then_refused']} / {t['refused_then_complied']}){at}"))
    for group, t in r["turns"].items():
        lo, hi = t["agreement_ci"]
        rows.append((f"{group}: judge on the first {early} tokens agrees with the full reply",
                     f"{fmt(t[f'early{early}_agreement'])}{ci_text(lo, hi, digits=2)}"))
    for group, w in (r.get("refusal_readout") or {}).items():
        windows = [k for k in w if k != "n"]
        rows.append((f"refusal readout at layer {r.get('readout_layer')}, {group} (n={w['n']}): "
                     + " / ".join(windows), " / ".join(fmt(w[k]) for k in windows)))
    for name, what in (("detection", "harmless replies"), ("compliance", "refused harmful replies")):
        for key, d in (r.get(name) or {}).items():
            k, group = key.split("/", 1)
            if group != "all":
                continue
            lo, hi = d["ci"]
            rows.append((f"early detection vs {what}, {k}: TPR at {r['fpr']:.0%} FPR, AUROC",
                         f"{fmt(d['tpr'])}{ci_text(lo, hi, digits=2)}, {fmt(d['auroc'], 3)} "
                         f"(n = {d['n_pos']} / {d['n_neg']})"))
        per_method = [(key.split("/", 1)[1], d) for key, d in (r.get(name) or {}).items()
                      if key.startswith("k=8/") and not key.endswith("/all")]
        if name == "detection" and per_method:
            rows.append((f"early detection vs {what}, k=8, per method: TPR (n)",
                         ", ".join(f"{g} {fmt(d['tpr'])} ({d['n_pos']})" for g, d in per_method)))
        note = r.get(f"{name}_note")
        if note:
            rows.append((f"early detection vs {what}", note))
    rows += _verdict_rows(metrics, ("reply_turns", "early_detection"))
    return _block(metrics, f"{r['n_replies']} replies of up to {metrics.get('config', {}).get('max_new_tokens')} "
                  f"tokens, recorded at layers {r['layers']}", rows)


#: README marker -> the table written between its markers
BLOCKS = {"metrics": readme_table, "harm": harm_table, "reply": reply_table}


def update_readme(metrics_path: str | os.PathLike, readme_path: str | os.PathLike, *, check: bool = False,
                  block: str = "metrics") -> bool:
    """Replace the block between ``<!-- {block}:begin -->`` and ``<!-- {block}:end -->`` in the README by its
    table (:data:`BLOCKS`: :func:`readme_table` or :func:`harm_table`) of ``metrics_path``. Returns True when
    the README changed (with ``check=True`` nothing is written)."""
    begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
    text = Path(readme_path).read_text(encoding="utf-8")
    if text.count(begin) != 1 or text.count(end) != 1:
        raise InputError(f"{readme_path} must contain one {begin} and one {end} line.")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    table = BLOCKS[block](read_json(metrics_path, what="metrics.json"))
    new = f"{head}{begin}\n{table}{end}{tail}"
    if new != text and not check:
        Path(readme_path).write_text(new, encoding="utf-8")
    return new != text


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m lens_safety.pipeline.readme",
                                description="Write the README's measured table from a run's metrics.json "
                                "(`lens-safety report OUT` re-renders a run's report).")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("readme", help="write metrics.json's table into README.md between the metrics markers")
    r.add_argument("metrics", help="a run's metrics.json")
    r.add_argument("readme", help="README.md with <!-- metrics:begin --> / <!-- metrics:end --> markers")
    r.add_argument("--check", action="store_true", help="only check: exit 1 if the README is out of date")
    r.add_argument("--block", choices=sorted(BLOCKS), default="metrics",
                   help="which generated block: the run's measured table (metrics), the harm-vs-refusal one (harm) "
                        "or the along-the-reply one (reply)")
    args = p.parse_args(argv)
    changed = update_readme(args.metrics, args.readme, check=args.check, block=args.block)
    print(f"{args.readme}: {'out of date' if args.check and changed else 'updated' if changed else 'up to date'}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
