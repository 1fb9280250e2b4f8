"""Figures of the harm / refusal analysis (matplotlib; each returns a Figure)."""

from __future__ import annotations

import numpy as np

from ...core.figures import figure_axes, label_colors, line_with_band, new_figure

__all__ = ["harm_refusal_figure", "steering_figure"]


def harm_refusal_figure(result, axes=None):
    """Three panels: per-layer cosine of the two directions (bootstrap CI) with each direction's held-out
    AUROC; every jailbreak group's gap fraction on each direction (the paper predicts harm kept >= 0.7,
    refusal dropped <= 0.5); the joint distribution of the two projections (refused: filled)."""
    if axes is None:
        fig, grid = new_figure(1, 3, size=(5.0, 4.2))
        a1, a2, a3 = grid[0]
    else:
        a1, a2, a3 = axes
        fig = a1.figure
    lay = result.layers
    line_with_band(a1, lay["layer"], lay["cosine"], lay["cosine_ci_low"], lay["cosine_ci_high"],
                   label="cosine(harm, refusal)", color="#7f7f7f")
    a1.plot(lay["layer"], lay["harm_auroc"], color="#d62728", label="harm direction AUROC")
    a1.plot(lay["layer"], lay["refusal_auroc"], color="#1f77b4", label="refusal direction AUROC")
    for x, c in ((result.harm_layer, "#d62728"), (result.refusal_layer, "#1f77b4")):
        a1.axvline(x, color=c, ls=":", lw=1)
    a1.set_xlabel("residual layer")
    a1.set_title("Two directions, layer by layer")
    a1.legend(fontsize=7)
    jb = result.chosen_fractions()
    groups = list(dict.fromkeys(jb["group"]))
    x = np.arange(len(groups))
    for off, (name, color) in zip((-0.2, 0.2), (("harm", "#d62728"), ("refusal", "#1f77b4"))):
        rows = jb[jb["direction"] == name].set_index("group").reindex(groups)
        err = np.vstack([rows["fraction"] - rows["ci_low"], rows["ci_high"] - rows["fraction"]])
        a2.bar(x + off, rows["fraction"], width=0.4, color=color, yerr=np.clip(np.nan_to_num(err), 0, None), capsize=2,
               label=f"{name} (layer {result.harm_layer if name == 'harm' else result.refusal_layer})")
    a2.axhline(0.7, color="#d62728", ls="--", lw=0.8)
    a2.axhline(0.5, color="#1f77b4", ls="--", lw=0.8)
    a2.axhline(0.0, color="k", lw=0.6)
    a2.set_xticks(x, groups, rotation=30, ha="right", fontsize=7)
    a2.set_ylabel("fraction of the harmful-harmless gap")
    a2.set_title("What a jailbreak does to each direction")
    a2.legend(fontsize=7)
    joint = result.joint
    colors = label_colors(list(dict.fromkeys(joint["set"])))
    for name, g in joint.groupby("set", sort=False):
        refused = g["refused"].astype("object")
        filled = refused.eq(True).to_numpy()
        a3.scatter(g["harm_projection"][~filled], g["refusal_projection"][~filled], s=12, facecolors="none",
                   edgecolors=colors[name], label=f"{name}")
        if filled.any():
            a3.scatter(g["harm_projection"][filled], g["refusal_projection"][filled], s=12, color=colors[name])
    a3.set_xlabel(f"harm projection (layer {result.harm_layer})")
    a3.set_ylabel(f"refusal projection (layer {result.refusal_layer})")
    a3.set_title("Joint distribution (filled: refused)")
    a3.legend(fontsize=7)
    return fig


def steering_figure(result, ax=None):
    """Mean change of the model's own harm judgement and of its refusal score under each steering, with CIs."""
    fig, ax = figure_axes(ax, size=(7.0, 3.8))
    f = result.to_frame()
    y = np.arange(len(f))
    for off, (col, color, label) in zip((-0.2, 0.2), (("judgement", "#9467bd", "harm judgement (yes - no)"),
                                                        ("refusal", "#1f77b4", "refusal score"))):
        err = np.vstack([f[f"{col}_delta"] - f[f"{col}_ci_low"], f[f"{col}_ci_high"] - f[f"{col}_delta"]])
        ax.barh(y + off, f[f"{col}_delta"], height=0.4, color=color, xerr=np.clip(np.nan_to_num(err), 0, None),
                capsize=2, label=label)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_yticks(y, [f"{r.steer} on {r.prompts}" for r in f.itertuples()], fontsize=7)
    ax.set_xlabel("mean change vs plain (logits)")
    ax.set_title("Steering each direction")
    ax.legend(fontsize=7)
    return fig
