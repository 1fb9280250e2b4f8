"""Figures of the analyses (probes, lens, grafting, patching, directions).

The drawing primitives and offline circuitsvis views live in :mod:`lens_safety.core.figures`, the
behaviour figures in :mod:`lens_safety.behaviour.figures`; both are re-exported here, so
``lens_safety.viz`` (the old name of this module) keeps every name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..behaviour.figures import pair_gap_figure, refusal_score_figure
from ..core.errors import InputError
from ..core.figures import (
    CATEGORY_COLORS,
    category_color,
    figure_axes,
    label_colors,
    line_with_band,
    new_figure,
    panel_axes,
    save_views,
    shorten,
    token_cell_text,
    token_fonts,
    token_scores_view,
    views_html,
    visible_text,
)
from ..core.htmlreport import OfflineView
from ..core.stats import nanmean

__all__ = ["CATEGORY_COLORS", "new_figure", "figure_axes", "line_with_band", "lens_heatmap",
           "category_mass_figure", "graft_figure", "lens_kl_figure", "tuned_lens_training_figure",
           "lens_comparison_figure", "label_colors", "lens_topk_view", "lens_trajectory_view",
           "token_scores_view", "views_html", "save_views", "probe_figure", "transfer_figure",
           "claim1_figure", "patch_figure", "direction_selection_figure", "direction_effects_figure",
           "coefficient_sweep_figure", "direction_geometry_figure", "refusal_score_figure",
           "pair_gap_figure"]


def lens_heatmap(result, prompt: int | None = None, label: str | None = None, layers: Sequence[int] | None = None,
                 max_chars: int = 10, ax=None):
    """Layers x rank table of lens tokens, cells coloured by lexicon category (the paper's figure).

    ``prompt=i``: that prompt's top-k tokens, cell text = token and probability. Otherwise
    the set (``label``, or all prompts) is summarised by its most frequent tokens per layer
    (as counted by :meth:`LensResult.consistency`), cell text = token and count/N.
    """
    from matplotlib.colors import to_rgb

    if prompt is not None and not -len(result) <= prompt < len(result):
        raise InputError(f"prompt must index one of the {len(result)} prompts, got {prompt}.")
    layers = list(range(result.n_layers + 1)) if layers is None else list(layers)
    k = result.top_k
    cells: list[list[tuple[str, str]]] = []
    if prompt is not None:
        for layer in layers:
            cells.append([(f"{token_cell_text(result.tokens[prompt, layer, r])[:max_chars]}\n"
                           f"{float(result.top_probs[prompt, layer, r]):.2f}",
                           str(result.top_categories[prompt, layer, r])) for r in range(k)])
        title = f"Logit lens, prompt {prompt} ({result.labels[prompt]})"
    else:
        sub = result
        if label is not None:
            rows = result._label_rows(label)
            sub = _subset(result, rows)
        cons = sub.consistency(by=None, n_top=k)
        n = len(sub)
        for layer in layers:
            top = cons.loc[cons["layer"] == layer, "top_tokens"].iloc[0]
            row = [(f"{token_cell_text(t)[:max_chars]}\n{c}/{n}", result.lexicon.category_of(t)) for t, c in top]
            row += [("", result.lexicon.neutral)] * (k - len(row))
            cells.append(row)
        title = f"Logit lens, most frequent tokens ({label or 'all'}, N={n})"
    if getattr(result, "lens", "logit") != "logit":
        title = title.replace("Logit lens", "Tuned lens")
    rgb = np.array([[to_rgb(category_color(c, light=True)) for _, c in row] for row in cells])
    fig, ax = figure_axes(ax, size=(1.3 * k + 1.5, 0.32 * len(layers) + 1.2))
    ax.imshow(rgb, aspect="auto", origin="lower")
    for i, row in enumerate(cells):
        for j, (text, _) in enumerate(row):
            ax.text(j, i, text, ha="center", va="center", fontsize=6, fontfamily=list(token_fonts()[0]))
    ax.set_xticks(range(k), [f"top {r + 1}" for r in range(k)])
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_ylabel("residual layer (0 = embedding)")
    ax.set_title(title, fontsize=9)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=category_color(c, light=True), label=c) for c in result.categories],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    return fig


def _subset(result, rows):
    from dataclasses import replace

    rows = np.asarray(rows)
    return replace(result, top_ids=result.top_ids[rows], top_probs=result.top_probs[rows],
                   tokens=result.tokens[rows], top_categories=result.top_categories[rows],
                   mass=result.mass[rows], prompts=type(result.prompts)([result.prompts[int(i)] for i in rows],
                                                             result.prompts.name))




def category_mass_figure(result, categories: Sequence[str] | None = None, labels: Sequence[str] | None = None,
                         level: float = 0.95, ax=None):
    """Per category, the mean lens probability mass per layer for each set, with CI bands
    (one panel per category; ``ax``: one Axes per category)."""
    cats = [c for c in result.categories if c != result.lexicon.neutral] if categories is None else list(categories)
    for c in cats:
        if c not in result.categories:
            raise InputError(f"Unknown category {c!r}; this lens has {result.categories}.")
    frame = result.category_mass(by="label", level=level)
    labels = list(dict.fromkeys(result.labels)) if labels is None else list(labels)
    colors = label_colors(labels)
    fig, axes = panel_axes(ax, len(cats), sharex=True)
    lens_name = "tuned lens" if getattr(result, "lens", "logit") != "logit" else "logit lens"
    for ax, cat in zip(axes, cats):
        for lab in labels:
            f = frame[(frame["label"] == lab) & (frame["category"] == cat)]
            if f.empty:
                raise InputError(f"No prompts with label {lab!r}.")
            line_with_band(ax, f["layer"], f["mean"], f["ci_low"].clip(lower=0), f["ci_high"].clip(upper=1),
                           label=f"{lab} (n={int(f['n'].iloc[0])})", color=colors[lab])
        ax.set_title(f"{cat} token mass ({lens_name})", fontsize=10)
        ax.set_xlabel("residual layer (0 = embedding)")
        ax.set_ylabel("mean probability")
        ax.legend(fontsize=7)
    return fig


def graft_figure(result, level: float = 0.95, ax=None):
    """Left: mean refusal score after grafting at each layer (CI band) and the ungrafted mean.
    Right: the mean paired change (grafted - ungrafted) with its CI; below 0 = less refusal.
    The final residual layer (where the output is the donor's own) is drawn as a hollow marker
    and excluded from the "best layer". ``ax``: a pair of axes."""
    frame = result.to_frame(level=level)
    final = frame["final"].to_numpy(bool) if "final" in frame else np.zeros(len(frame), bool)
    fig, (ax, ax2) = panel_axes(ax, 2, sharex=True)
    shown = frame[~final]
    line_with_band(ax, shown["layer"], shown["score"], shown["score_ci_low"], shown["score_ci_high"],
                   label=f"grafted ({result.donor})", color="#1f77b4")
    ax.axhline(float(frame["score_before"].iloc[0]), color="#d62728", linestyle="--", label="no graft")
    ax.set_ylabel("refusal score (last position)")
    ax.set_title(f"Logit grafting, {result.model_name} (n={len(result.prompts)})", fontsize=10)
    ax.legend(fontsize=7)
    line_with_band(ax2, shown["layer"], shown["delta"], shown["delta_ci_low"], shown["delta_ci_high"],
                   color="#1f77b4")
    if final.any():
        fin = frame[final]
        ax.plot(fin["layer"], fin["score"], "o", mfc="none", color="#1f77b4", label="final layer (donor's own)")
        ax2.plot(fin["layer"], fin["delta"], "o", mfc="none", color="#1f77b4")
    ax2.axhline(0.0, color="grey", linewidth=0.8)
    ax2.set_ylabel("change in refusal score")
    title = f"best layer {result.best_layer()} (largest drop)"
    if "frac_flipped" in frame and hasattr(result, "earliest_compliance_layer"):
        e = result.earliest_compliance_layer(level=level)
        title += f"; most refusals flip from layer {e['layer']}" if e["layer"] is not None else "; never >50% flip"
    ax2.set_title(title, fontsize=9)
    for a in (ax, ax2):
        a.set_xlabel("grafted residual layer (0 = embedding)")
    return fig


_LENS_COLORS = {"logit": "#7f7f7f", "tuned": "#1f77b4"}


def lens_kl_figure(frame, ax=None, log: bool = True):
    """KL(final || layer readout) per layer with its CI band, one curve per lens (the frame of
    :func:`lens_safety.analyses.lens.tuned.lens_kl`, or several concatenated). The last layer (KL 0) is
    not drawn on the log scale."""
    need = {"layer", "kl", "ci_low", "ci_high"}
    if not need <= set(frame.columns):
        raise InputError(f"Expected a lens_kl frame with columns {sorted(need)}, got {list(frame.columns)}.")
    fig, ax = figure_axes(ax)
    groups = frame.groupby("lens", sort=False) if "lens" in frame else [("lens", frame)]
    for name, g in groups:
        g = g.sort_values("layer")
        if log:
            g = g[g["kl"] > 0]
        n = int(g["n"].iloc[0]) if "n" in g and len(g) else 0
        line_with_band(ax, g["layer"], g["kl"], g["ci_low"].clip(lower=1e-6 if log else None), g["ci_high"],
                       label=f"{name} lens (n={n})", color=_LENS_COLORS.get(name))
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("residual layer (0 = embedding)")
    ax.set_ylabel("KL(final || layer readout), nats")
    ax.set_title("How far each layer's readout is from the model's output", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def tuned_lens_training_figure(lens, ax=None):
    """The tuned lens's training curve: estimated KL (mean over layers) per optimiser step."""
    fig, ax = figure_axes(ax)
    f = lens.to_frame()
    ax.plot(f["step"], f["kl"], color=_LENS_COLORS["tuned"], linewidth=0.8, alpha=0.5)
    if len(f) >= 10:
        ax.plot(f["step"], f["kl"].rolling(10, min_periods=1).mean(), color=_LENS_COLORS["tuned"], label="mean of 10")
        ax.legend(fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("estimated KL, mean over layers (nats)")
    ax.set_title(f"Tuned lens training, {lens.model_name} ({lens.data.get('n_positions')} positions)", fontsize=10)
    return fig


def lens_comparison_figure(comparison, categories: Sequence[str] = ("refusal", "positive"), axes=None):
    """Panel 1: KL per layer for both lenses; then, per category, the mass curves of each set read
    with the logit lens (dashed) and the tuned lens (solid), with CI bands for the tuned lens."""
    cats = list(categories)
    for c in cats:
        if c not in comparison.logit.categories:
            raise InputError(f"Unknown category {c!r}; the lens has {comparison.logit.categories}.")
    fig, axs = panel_axes(axes, 1 + len(cats))
    lens_kl_figure(comparison.kl, ax=axs[0])
    labels = list(dict.fromkeys(comparison.logit.labels))
    colors = label_colors(labels)
    frames = {"logit": comparison.logit.category_mass(), "tuned": comparison.tuned.category_mass()}
    for ax, cat in zip(axs[1:], cats):
        for lab in labels:
            for name, style in (("logit", "--"), ("tuned", "-")):
                f = frames[name]
                f = f[(f["label"] == lab) & (f["category"] == cat)]
                if name == "tuned":
                    line_with_band(ax, f["layer"], f["mean"], f["ci_low"].clip(lower=0), f["ci_high"].clip(upper=1),
                                   label=f"{lab}, tuned", color=colors[lab])
                else:
                    ax.plot(f["layer"], f["mean"], style, color=colors[lab], linewidth=1, label=f"{lab}, logit")
        ax.set_title(f"{cat} token mass: logit (dashed) vs tuned lens", fontsize=9)
        ax.set_xlabel("residual layer (0 = embedding)")
        ax.set_ylabel("mean probability")
        ax.legend(fontsize=6)
    return fig


# -- probes figures ------------------------------------------------------------------------------

def _probe_items(result, others, label):
    from collections.abc import Mapping as _Mapping

    items = [(label or f"{result.model_name or 'model'} · {result.classifier}", result)]
    if isinstance(others, _Mapping):
        items += list(others.items())
    else:
        items += [(f"{o.model_name or 'model'} · {o.classifier}", o) for o in others]
    return items


def probe_figure(result, ax=None, others=(), relative_depth: bool = False, label: str | None = None,
                 controls: bool = True):
    """Probe accuracy per layer (a :class:`~lens_safety.analyses.probes.ProbeResult`) with 95% CI bands, the
    shuffled-label and length-only controls, and ``others`` overlaid. Returns the Figure.

    >>> import numpy as np
    >>> from lens_safety.analyses.probes import ProbeResult
    >>> acc = np.array([0.5, 0.9, 1.0])
    >>> r = ProbeResult([0, 1, 2], {"accuracy": acc, "ci_low": acc - .05, "ci_high": acc}, ["a", "b"],
    ...                 "svm", "a-vs-b", 100, 5, 0, 2, 0.5)
    >>> len(probe_figure(r).axes[0].lines) >= 2
    True
    """
    fig, ax = figure_axes(ax, (7.0, 4.0))
    items = _probe_items(result, others, label)
    for name, r in items:
        x = np.asarray(r.layers, dtype=float) / (r.n_layers if relative_depth else 1)
        line, = ax.plot(x, r.metrics["accuracy"], marker="o", ms=3, label=name)
        ax.fill_between(x, r.metrics["ci_low"], r.metrics["ci_high"], color=line.get_color(), alpha=0.2)
        if controls:
            if np.isfinite(r.metrics["shuffled_accuracy"]).any():
                ax.plot(x, r.metrics["shuffled_accuracy"], ls="--", lw=1, color=line.get_color(), alpha=0.7,
                        label=f"{name}: shuffled labels")
            if np.isfinite(r.metrics["length_accuracy"]).any():
                ax.plot(x, r.metrics["length_accuracy"], ls=":", lw=1, color=line.get_color(), alpha=0.7,
                        label=f"{name}: length only")
    ax.axhline(result.chance, color="grey", lw=0.8, label="chance (majority class)")
    ax.set_xlabel("relative depth (layer / n_layers)" if relative_depth else "layer (0 = embedding output)")
    ax.set_ylabel(f"{result.cv}-fold CV accuracy")
    ax.set_ylim(min(0.3, ax.get_ylim()[0]), 1.02)
    ax.set_title(f"Probe accuracy per layer: {result.task}")
    ax.legend(fontsize=7)
    return fig


def transfer_figure(result, ax=None, relative_depth: bool = False, label: str | None = None):
    """Fraction of test prompts classified ``positive`` per layer (a
    :class:`~lens_safety.analyses.probes.TransferResult`) with its 95% CI band. Returns the Figure."""
    fig, ax = figure_axes(ax, (7.0, 4.0))
    x = np.asarray(result.layers, dtype=float) / (result.n_layers if relative_depth else 1)
    name = label or f"{result.test_name}: classified {result.positive}"
    if result.holdout != "none":
        name += f" ({result.holdout} by request)"
    line, = ax.plot(x, result.positive_rate, marker="o", ms=3, label=name)
    ax.fill_between(x, result.rate_low, result.rate_high, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("relative depth" if relative_depth else "layer (0 = embedding output)")
    ax.set_ylabel(f"fraction classified {result.positive}")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    return fig


def claim1_figure(verdicts, ax=None):
    """Claim 1 side by side: each :class:`~lens_safety.analyses.probes.Claim1Verdict`'s accuracy curve with
    its CI band, the threshold, and the early layers shaded; the verdict in the legend. Returns the Figure."""
    from collections.abc import Mapping as _Mapping

    items = list(verdicts.values()) if isinstance(verdicts, _Mapping) else list(verdicts)
    if not items or any(getattr(v, "result", None) is None for v in items):
        raise InputError("claim1_figure needs Claim1Verdict objects made by probes.claim1_verdict(result).")
    fig, ax = figure_axes(ax, (7.0, 4.0))
    for v in items:
        r = v.result
        x = np.asarray(r.layers, dtype=float)
        line_with_band(ax, x, r.metrics["accuracy"], r.metrics["ci_low"], r.metrics["ci_high"],
                       label=f"{v.name}: {v.verdict}")
    first = items[0]
    ax.axhline(first.threshold, color="black", lw=0.8, ls="--", label=f"threshold {first.threshold}")
    ax.axvspan(0.5, first.early + 0.5, color="grey", alpha=0.12, label=f"early layers 1–{first.early}")
    ax.set_xlabel("layer (0 = embedding output)")
    ax.set_ylabel("CV accuracy (95% Wilson CI)")
    ax.set_ylim(min(0.4, ax.get_ylim()[0]), 1.02)
    ax.set_title("Claim 1: harmful vs harmless, per layer")
    ax.legend(fontsize=7, loc="lower right")
    return fig


# -- patching figures ----------------------------------------------------------------------------

def patch_figure(result, ax=None, *, n_boot: int = 1000, seed: int = 0, normalize: str | None = None):
    """Activation patching: a heatmap of mean recovery (component x block, per direction) above the
    mean recovery curves with their 95% BCa bootstrap bands over pairs. On ``ax`` (when given):
    the curves only. Returns the figure.

    >>> import lens_safety as ls
    >>> m = ls.testing.tiny_model()
    >>> r = ls.patch_layers(m, [("Tell me a story.", "Sure! Tell me a story.")], min_gap=None, progress=False)
    >>> len(patch_figure(r, n_boot=20).axes) >= 2
    True
    """
    comps = [c for c in result.components if c != "z"]
    rows = [(c, d) for d in result.directions for c in comps]
    if not rows or result.per_position:
        raise InputError("A patching figure needs a result with whole-position patches of resid_pre / attn_out / "
                         "mlp_out (per_position=False, not heads only).")
    norm = result.normalize if normalize is None else normalize
    if ax is None:
        import matplotlib.pyplot as plt

        fig, (ax1, ax) = plt.subplots(
            2, 1, figsize=(max(6.0, 0.38 * result.n_layers + 2), 2.4 + 0.5 * len(rows) + 3),
            gridspec_kw={"height_ratios": [0.5 * len(rows) + 0.6, 3]}, layout="constrained")

        mat = np.array([nanmean(result.recovery_matrix(c, d, norm), 0) for c, d in rows])
        lim = max(1.0, float(np.nanmax(np.abs(mat))) if np.isfinite(mat).any() else 1.0)
        im = ax1.imshow(mat, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax1.set_yticks(range(len(rows)), [f"{c} ({d})" for c, d in rows])
        ax1.set_xticks(range(result.n_layers))
        ax1.set_xlabel("block (resid_pre l = residual layer l)")
        if result.n_layers <= 32:
            for (r, c), v in np.ndenumerate(mat):
                if np.isfinite(v):
                    ax1.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6)
        fig.colorbar(im, ax=ax1, label="mean recovery")
        dropped = f", {len(result.dropped)} dropped" if result.dropped else ""
        ax1.set_title(f"{result.method} patching, {result.n_pairs} pairs{dropped}, {result.model_name}")
    else:
        fig = ax.figure
    x = np.arange(result.n_layers)
    for c, d in rows:
        mean, lo, hi = result.mean_recovery(c, d, normalize=norm, n_boot=n_boot, seed=seed)
        line_with_band(ax, x, mean, lo, hi, label=f"{c} ({d})")
    ax.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("block")
    ax.set_ylabel(f"recovery ({'per pair' if norm == 'pair' else 'by mean gap'}; mean, 95% CI)")
    ax.legend(fontsize=7)
    return fig



def lens_topk_view(result, prompts: Sequence[int] = (0,)):
    """circuitsvis ``topk_tokens`` view: for each chosen prompt, the top-k lens tokens per layer.

    Each sample's "tokens" are the distinct tokens that reach a prompt's top-k at some layer;
    the activation of a token at a layer is its lens probability there (0 where it is not in
    that layer's top-k), so the view's top-k column is exactly the lens top-k.
    """
    from circuitsvis.topk_tokens import topk_tokens

    prompts = [int(p) for p in prompts]
    if not prompts:
        raise InputError("Choose at least one prompt index.")
    tokens, acts, names = [], [], []
    for p in prompts:
        if not -len(result) <= p < len(result):
            raise InputError(f"prompt index {p} is out of range for {len(result)} prompts.")
        ids = result.top_ids[p]  # [layer, k]
        uniq = list(dict.fromkeys(ids.reshape(-1).tolist()))
        pos = {t: i for i, t in enumerate(uniq)}
        a = np.zeros((result.n_layers + 1, len(uniq), 1), dtype=np.float32)  # [layer, token, column]
        for layer in range(result.n_layers + 1):
            for r in range(result.top_k):
                a[layer, pos[int(ids[layer, r])], 0] = float(result.top_probs[p, layer, r])
        pieces = {int(i): visible_text(t) for i, t in zip(ids.reshape(-1).tolist(), result.tokens[p].reshape(-1))}
        tokens.append([pieces[t] for t in uniq])
        acts.append(a)
        names.append(f"{p}: [{result.labels[p]}] {shorten(result.prompts[p].text, 60)}")
    return OfflineView.from_function(
        topk_tokens, tokens, acts, max_k=result.top_k, first_dimension_name="Layer",
        third_dimension_name="Lens probability", sample_labels=names,
        first_dimension_labels=[f"layer {i}" for i in range(result.n_layers + 1)])


def lens_trajectory_view(result, prompt: int = 0, refusal: str = "refusal", over: str = "positive"):
    """circuitsvis ``colored_tokens``: the top-1 lens token of each layer, coloured by the layer's
    refusal mass minus positive mass (red = refusal, green = positive)."""
    if not -len(result) <= prompt < len(result):
        raise InputError(f"prompt index {prompt} is out of range for {len(result)} prompts.")
    for c in (refusal, over):
        if c not in result.categories:
            raise InputError(f"Unknown category {c!r}; this lens has {result.categories}.")
    m = result.mass[prompt]
    values = (m[:, result.categories.index(refusal)] - m[:, result.categories.index(over)]).tolist()
    tokens = [f"[{layer}]{visible_text(result.tokens[prompt, layer, 0])} " for layer in range(result.n_layers + 1)]
    return token_scores_view(tokens, values, min_value=-1.0, max_value=1.0,
                             negative_color="#2ca02c", positive_color="#d62728")



def direction_selection_figure(selection, ax=None):
    """Heatmaps (template position x layer) of the refusal-direction candidates' validation scores:
    ablation refusal score, harmless KL under ablation, addition score; the chosen one is boxed.
    With ``ax`` only the ablation-score panel is drawn there."""
    import matplotlib.pyplot as plt

    panels = [("ablation_score", "harmful refusal score, ablated", "coolwarm"),
              ("kl", "harmless KL, ablated", "viridis"),
              ("addition_score", "harmless refusal score, added", "coolwarm")]
    if ax is not None:
        fig, axes = ax.figure, [ax]
        panels = panels[:1]
    else:
        fig, grid = new_figure(1, 3, size=(4.2, 2.6))
        axes = list(grid[0])
    d = selection.direction
    for a, (attr, title, cmap) in zip(axes, panels):
        m = np.asarray(getattr(selection, attr), dtype=float)
        kw = {}
        if cmap == "coolwarm" and np.isfinite(m).any():
            v = float(np.nanmax(np.abs(m))) or 1.0
            kw = {"vmin": -v, "vmax": v}
        im = a.imshow(np.ma.masked_invalid(m), aspect="auto", cmap=cmap, interpolation="nearest", **kw)
        a.set_xticks(range(len(selection.layers)), [str(x) for x in selection.layers], fontsize=7)
        a.set_yticks(range(len(selection.positions)), [str(p) for p in selection.positions], fontsize=7)
        a.set_xlabel("layer (residual stream input of block)")
        a.set_ylabel("template position")
        a.set_title(title, fontsize=9)
        plt.colorbar(im, ax=a, shrink=0.8)
        if d is not None:
            i, j = selection.positions.index(d.position), selection.layers.index(d.layer)
            a.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="k", linewidth=2))
    return fig


def direction_effects_figure(effects, ax=None):
    """Judge refusal rate (Wilson 95% CI) of each prompt set, plain and with the direction ablated / added."""
    fig, ax = figure_axes(ax, size=(6.5, 3.5))
    t = effects.to_frame()
    conds = ["plain", "ablate", "add"]
    colors = {"plain": "#7f7f7f", "ablate": "#1f77b4", "add": "#d62728"}
    sets = list(dict.fromkeys(t["set"]))
    width = 0.8 / len(conds)
    for k, c in enumerate(conds):
        sub = t[t["condition"] == c].set_index("set")
        xs = [i + (k - 1) * width for i, s in enumerate(sets) if s in sub.index]
        rows = [sub.loc[s] for s in sets if s in sub.index]
        if not rows:
            continue
        y = np.array([r["refusal_rate"] for r in rows])
        err = np.array([[r["refusal_rate"] - r["ci_low"] for r in rows],
                        [r["ci_high"] - r["refusal_rate"] for r in rows]])
        label = {"plain": "plain", "ablate": "direction ablated", "add": f"direction added (x{effects.coeff:g})"}[c]
        ax.bar(xs, y, width, yerr=err, capsize=3, color=colors[c], label=label)
    ax.set_xticks(range(len(sets)), sets)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("refusal rate (judge)")
    ax.set_title(f"Refusal direction: ablation and addition (harmless KL {effects.kl_harmless:.3f})", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def coefficient_sweep_figure(sweep, ax=None):
    """First-token refusal score against the addition coefficient: every prompt (thin) and the mean per
    label (thick); dashed: the mean with a cautious system prompt (prompting baseline)."""
    fig, ax = figure_axes(ax, size=(6.0, 3.8))
    labels = np.asarray(sweep.labels)
    colors = label_colors(sorted(set(sweep.labels)))
    for lab in sorted(set(sweep.labels)):
        m = labels == lab
        ax.plot(sweep.coeffs, sweep.scores[:, m], color=colors[lab], alpha=0.15, linewidth=0.7)
        ax.plot(sweep.coeffs, sweep.scores[:, m].mean(1), color=colors[lab], linewidth=2.5, marker="o",
                label=f"{lab} (n={int(m.sum())})")
        if sweep.system is not None:
            ax.axhline(float(sweep.system[m].mean()), color=colors[lab], linestyle="--", linewidth=1,
                       label=f"{lab}, cautious system prompt")
    ax.axhline(0.0, color="k", linewidth=0.8)
    ax.set_xlabel(f"coefficient (x difference of means, added at layer {sweep.layer})")
    ax.set_ylabel("first-token refusal score (> 0: refuses)")
    ax.legend(fontsize=7)
    return fig


def direction_geometry_figure(geometry, ax=None):
    """Mean projection of each prompt group on the refusal direction per layer (95% CI); probe cosines
    on a second axis when present; the direction's layer marked."""
    fig, ax = figure_axes(ax, size=(6.5, 3.8))
    t = geometry.to_frame()
    groups = [g for g in dict.fromkeys(t["group"]) if g != "probe cosine"]
    colors = label_colors(groups)
    for g in groups:
        s = t[t["group"] == g]
        line_with_band(ax, s["layer"], s["projection"], s["ci_low"], s["ci_high"], label=g, color=colors[g])
    ax.axvline(geometry.direction_layer, color="k", linestyle=":", linewidth=1)
    ax.set_xlabel("residual layer (0 = embedding)")
    ax.set_ylabel("projection on the refusal direction")
    ax.legend(fontsize=8, loc="upper left")
    cos = t[t["group"] == "probe cosine"]
    if len(cos):
        ax2 = ax.twinx()
        ax2.plot(cos["layer"], cos["projection"], color="#555555", linestyle="--", label="cos(probe normal, direction)")
        ax2.set_ylim(-1, 1)
        ax2.set_ylabel("cosine with probe normal")
        ax2.legend(fontsize=8, loc="lower right")
    return fig


# -- judge figures --------------------------------------------------------------------------------

