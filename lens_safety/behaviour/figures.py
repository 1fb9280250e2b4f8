"""Figures of behaviour results: first-token refusal scores and jailbreak pairs."""

from __future__ import annotations

from ..core.figures import figure_axes

__all__ = ["refusal_score_figure", "pair_gap_figure"]


def refusal_score_figure(result, ax=None, bins: int = 30):
    """Histogram of first-token refusal scores per group (jailbreak method, else label) of a
    :class:`~lens_safety.behaviour.refusal.RefusalResult`; the dashed line is the greedy decision (0)."""
    import numpy as np

    fig, ax = figure_axes(ax, size=(6.0, 3.5))
    groups: dict[str, list[float]] = {}
    for p, s in zip(result.prompts, result.score):
        groups.setdefault(p.method or p.label, []).append(float(s))
    lo, hi = (float(np.min(result.score)), float(np.max(result.score))) if len(result) else (-1.0, 1.0)
    edges = np.linspace(lo - 1e-6, hi + 1e-6, bins + 1)
    for name, vals in groups.items():
        ax.hist(vals, bins=edges, alpha=0.5, label=f"{name} (n={len(vals)})")
    ax.axvline(0.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("first-token refusal score (> 0: greedy reply starts a refusal)")
    ax.set_ylabel("prompts")
    ax.set_title(f"Refusal score, {result.model_name} (refused {result.refusal_rate:.2f})")
    if groups:
        ax.legend(fontsize=8)
    return fig


def pair_gap_figure(pairs, ax=None):
    """Score gap (plain - jailbroken, logits) of every candidate pair of a
    :class:`~lens_safety.behaviour.pairs.PairSet`, per method: kept pairs, and dropped ones by reason;
    the dotted line is ``min_gap``."""
    import numpy as np

    fig, ax = figure_axes(ax, size=(6.5, 3.8))
    methods = sorted(set(pairs.methods) | set(pairs.dropped["method"]))
    ypos = {m: i for i, m in enumerate(methods)}
    rng = np.random.default_rng(0)
    kept = pairs.to_frame()
    styles = {"kept": ("#2ca02c", "o"), "gap below min_gap": ("#d62728", "x"), "unengaged": ("#ff7f0e", "s"),
              "refused": ("#7f7f7f", ".")}
    parts = [("kept", kept)] + [(r, pairs.dropped[pairs.dropped["reason"] == r]) for r in styles if r != "kept"]
    for name, frame in parts:
        if not len(frame):
            continue
        color, marker = styles[name]
        y = np.array([ypos[m] for m in frame["method"]]) + rng.uniform(-0.2, 0.2, len(frame))
        ax.scatter(frame["gap"], y, color=color, marker=marker, label=f"{name} ({len(frame)})", alpha=0.8)
    if "min_gap" in pairs.config:
        ax.axvline(pairs.config["min_gap"], color="k", ls=":", lw=1)
    ax.axvline(0.0, color="k", lw=0.6)
    ax.set_yticks(range(len(methods)), methods)
    ax.set_xlabel("score gap plain - jailbroken (logits)")
    ax.set_title(f"Jailbreak pairs, {pairs.model_name}: {len(pairs)} kept, {len(pairs.dropped)} dropped")
    if methods:
        ax.legend(fontsize=8)
    return fig
