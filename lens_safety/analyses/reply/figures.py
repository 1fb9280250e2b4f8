"""Figures of the readouts along replies, of turning replies and of early detection, and a circuitsvis view
of one reply coloured per token by a readout (offline)."""

from __future__ import annotations

import numpy as np

from ...core.errors import InputError
from ...core.figures import figure_axes, label_colors, line_with_band, shorten, token_scores_view, visible_text
from ...core.stats import mean_ci

__all__ = ["readout_figure", "reply_view", "turns_figure", "detection_figure"]

_LABELS = {"refusal": "refusal direction (gap fraction: 0 harmless, 1 harmful prompts)",
           "harm": "harm direction (gap fraction)", "probe": "harmfulness probe (log-odds)",
           "lens_refusal": "lens mass on refusal starts", "lens_affirm": "lens mass on compliance starts"}


def readout_figure(readouts, readout: str = "refusal", *, layer: int | None = None, by: str = "group", ax=None,
                   max_step: int | None = None):
    """Mean ``readout`` (95% CI band) vs step (0 = last prompt token, k = reply token k), one line per value of
    ``by`` (a column of ``readouts.replies``: ``group``, ``method``, ``outcome``)."""
    col = readouts.column(readout, layer)
    if by not in readouts.replies.columns:
        raise InputError(f"by={by!r} is not a reply column; use one of {list(readouts.replies.columns)}.")
    fig, ax = figure_axes(ax, size=(7.0, 4.0))
    j = readouts.columns.index(col)
    keys = readouts.replies[by].astype(str).to_numpy()
    colors = label_colors(sorted(set(keys)))
    last = int(readouts.step.max()) if max_step is None else int(max_step)
    for key in dict.fromkeys(keys):
        sel = np.isin(readouts.reply, np.flatnonzero(keys == key))
        steps, means, lows, highs = [], [], [], []
        for s in range(last + 1):
            v = readouts.values[sel & (readouts.step == s), j]
            if len(v) >= 2:
                m, lo, hi = mean_ci(v.astype(np.float64))
                steps.append(s)
                means.append(m)
                lows.append(lo)
                highs.append(hi)
        n = int((keys == key).sum())
        line_with_band(ax, steps, means, lows, highs, label=f"{key} (n={n})", color=colors[key])
    ax.axvline(0, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("step (0 = last prompt token, k = after reply token k)")
    ax.set_ylabel(_LABELS.get(readout, readout))
    ax.set_title(f"{readout} along the reply, layer {col.split('@')[1]}")
    ax.legend(fontsize=7, loc="best")
    return fig


def reply_view(readouts, i: int, readout: str = "refusal", *, layer: int | None = None):
    """circuitsvis ``colored_tokens``: reply ``i`` (from the last prompt token on), each token coloured by
    ``readout`` at ``layer`` (red high, blue low); offline HTML in notebooks and the report."""
    if not -len(readouts) <= i < len(readouts):
        raise InputError(f"reply index {i} is out of range for {len(readouts)} replies.")
    i = i % len(readouts)
    values = readouts.series(i, readout, layer)
    rows = np.flatnonzero(readouts.reply == i)
    tokens = [visible_text(readouts.tokens[r]) for r in rows]
    bound = float(np.nanmax(np.abs(values))) if len(values) else 1.0
    lo, hi = (0.0, max(bound, 1e-6)) if readout.startswith("lens_") else (-max(bound, 1e-6), max(bound, 1e-6))
    view = token_scores_view(tokens, values, min_value=lo, max_value=hi, negative_color="#1f77b4",
                             positive_color="#d62728")
    row = readouts.replies.iloc[i]
    view.caption = (f"[{row['group']}, judged {row['outcome']}] {shorten(str(row['request']), 70)} -- "
                    f"coloured by {readouts.column(readout, layer)}")
    return view


def turns_figure(turns, ax=None):
    """Per group: share of replies judged complied on the first m tokens (m = each prefix) and on the full
    reply, so a rising or falling line is replies turning."""
    fig, ax = figure_axes(ax, size=(7.0, 4.0))
    frame = turns.frame
    groups = list(dict.fromkeys(frame["group"]))
    colors = label_colors(sorted(groups))
    for g in groups:
        df = frame[frame["group"] == g]
        ys = [float((df[f"at_{m}"] == "complied").mean()) for m in turns.prefixes]
        ys.append(float((df["final"] == "complied").mean()))
        ax.plot(list(range(len(ys))), ys, marker="o", color=colors[g], label=f"{g} (n={len(df)}, "
                f"turned {int(df['turned'].sum())})")
    ax.set_xticks(range(len(turns.prefixes) + 1), [str(m) for m in turns.prefixes] + ["full"])
    ax.set_xlabel("reply prefix judged (tokens)")
    ax.set_ylabel("share judged complied")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("The judge on growing prefixes of each reply")
    ax.legend(fontsize=7, loc="best")
    return fig


def detection_figure(detection, ax=None):
    """TPR at the chosen FPR (95% CI) vs k, overall and per jailbreak method; k = 0 is the prompt-only
    baseline."""
    fig, ax = figure_axes(ax, size=(7.0, 4.0))
    frame = detection.frame
    if not len(frame):
        ax.text(0.5, 0.5, detection.note or "not measured", ha="center", va="center", wrap=True)
        return fig
    groups = list(dict.fromkeys(frame["group"]))
    colors = label_colors(sorted(groups))
    for g in groups:
        df = frame[frame["group"] == g].sort_values("k")
        lw = 2.5 if g == "all" else 1.2
        ax.errorbar(df["k"], df["tpr"], yerr=[np.clip(df["tpr"] - df["ci_low"], 0, None),
                                              np.clip(df["ci_high"] - df["tpr"], 0, None)],
                    marker="o", lw=lw, capsize=3, color="black" if g == "all" else colors[g],
                    label=f"{g} (n={int(df['n_pos'].iloc[0])})")
    ax.axhline(0.9, color="0.6", lw=0.8, ls="--")
    ax.set_xlabel("reply tokens read (k; 0 = prompt only)")
    negatives = "harmless replies" if detection.against == "harmless" else "refused harmful replies"
    ax.set_ylabel(f"TPR at {detection.fpr:.0%} FPR on {negatives}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Early detection of compliance with harmful requests (vs {negatives})")
    ax.legend(fontsize=7, loc="best")
    return fig
