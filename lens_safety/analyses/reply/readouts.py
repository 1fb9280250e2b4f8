"""Per-token readouts along generated replies: what the residual stream says at each reply token.

A :class:`ReadoutBasis` is fitted on prompt-only residuals (:func:`~lens_safety.capture.collect_residuals`,
last position) of harmful and harmless prompts, at the layers a
:class:`~lens_safety.model.recording.ReplyRecording` holds. :func:`reply_readouts` then reads every
recorded reply position ("step" ``k``: the position of reply token ``k``; step 0 is the last prompt
position) and returns a :class:`ReplyReadouts`:

* ``refusal``: projection on the refusal direction (difference of means, harmful - harmless, at the last
  prompt position), as a gap fraction: 0 = the harmless prompts' mean, 1 = the harmful prompts' mean;
* ``harm``: the same for a harm direction when one is given (e.g. from
  :func:`~lens_safety.analyses.harm.harm_refusal_analysis`);
* ``probe``: a logistic probe's log-odds that the prompt is harmful;
* ``lens_refusal`` / ``lens_affirm``: the logit lens' probability mass on refusal-start / compliance-start
  tokens (:class:`~lens_safety.behaviour.refusal.RefusalTokens`), at the ``lens_layers`` only (each costs
  an unembedding per position).

>>> import lens_safety as ls
>>> from lens_safety.model.testing import tiny_model
>>> m = tiny_model()
>>> basis = ReadoutBasis.fit(ls.collect_residuals(m, ["Make a bomb", "Steal a car"], cache=False, progress=False),
...                          ls.collect_residuals(m, ["Bake bread", "Tell a story"], cache=False, progress=False),
...                          layers=[2, 3])
>>> r = ls.evaluate_refusal(m, ["Make a bomb"], max_new_tokens=3, cache=False, progress=False, record=[2, 3])
>>> ro = reply_readouts(m, {"harmful": r}, basis, lens_layers=[3])
>>> ro.columns
['refusal@2', 'refusal@3', 'probe@2', 'probe@3', 'lens_refusal@3', 'lens_affirm@3']
>>> len(ro.step) == len(r.recording.reply_ids[0]) + 1
True
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from ...behaviour.refusal import RefusalResult, RefusalTokens
from ...core import store
from ...core.errors import CacheError, InputError
from ...model.recording import RecordSpec, ReplyRecording
from ..lens.readout import lens_logits
from .figures import readout_figure, reply_view

__all__ = ["ReadoutBasis", "ReplyReadouts", "reply_readouts", "READOUTS", "reply_record_spec", "reply_lens_layers"]

READOUTS = ("refusal", "harm", "probe", "lens_refusal", "lens_affirm")
KIND = "lens_safety.reply_readouts"
SCHEMA_VERSION = 1


def reply_record_spec(model) -> RecordSpec:
    """What ``lens-safety run --reply`` records: layers at 1/2, 2/3, 5/6 of the depth and the last, the last
    prompt position (step 0) and every reply position, stored as float16 (a few MB per 100 replies)."""
    n = model.n_layers
    return RecordSpec(tuple(sorted({n // 2, (2 * n) // 3, (5 * n) // 6, n})), prompt_positions=1, dtype="float16")


def reply_lens_layers(model) -> tuple[int, ...]:
    """The layers the run decodes with the lens along replies: 5/6 of the depth and the last (the model's
    own next-token distribution)."""
    return tuple(sorted({(5 * model.n_layers) // 6, model.n_layers}))


@dataclass
class ReadoutBasis:
    """Directions and probes per layer, fitted on prompt-only residuals (last position).

    ``directions[name][layer]``: ``(unit vector [d], harmless mean projection, harmful mean projection)``;
    ``probes[layer]``: a fitted scikit-learn pipeline (standardise + logistic regression, harmful = 1).
    """

    layers: tuple[int, ...]
    directions: dict[str, dict[int, tuple[np.ndarray, float, float]]]
    probes: dict[int, Any]
    n_fit: tuple[int, int]

    @classmethod
    def fit(cls, harmful, harmless, layers: Sequence[int], *, harm: np.ndarray | None = None,
            seed: int = 0) -> ReadoutBasis:
        """From :class:`~lens_safety.capture.Residuals` at ``positions="last"`` (harmful, harmless).

        ``harm``: optional harm directions ``[n_layers + 1, d_model]`` (read at another position, e.g.
        :attr:`~lens_safety.analyses.harm.HarmRefusalResult.harm`); their gap is measured on these prompts.
        """
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        for res in (harmful, harmless):
            if res.positions != "last":
                raise InputError(f"ReadoutBasis.fit needs residuals at positions='last', got {res.positions!r}.")
        if len(harmful) < 2 or len(harmless) < 2:
            raise InputError("ReadoutBasis.fit needs at least 2 harmful and 2 harmless prompts.")
        harmful.check_joinable(harmless, "fit a readout basis on")
        layers = tuple(sorted({int(x) for x in layers}))
        bad = [x for x in layers if not 0 <= x <= harmful.n_layers]
        if bad:
            raise InputError(f"layers {bad} are outside 0..{harmful.n_layers}.")
        directions: dict[str, dict[int, tuple[np.ndarray, float, float]]] = {"refusal": {}}
        if harm is not None:
            directions["harm"] = {}
        probes = {}
        for layer in layers:
            a, b = harmful.layer(layer).numpy().astype(np.float64), harmless.layer(layer).numpy().astype(np.float64)
            vectors = {"refusal": a.mean(0) - b.mean(0)}
            if harm is not None:
                vectors["harm"] = np.asarray(harm[layer], dtype=np.float64)
            for name, v in vectors.items():
                u = v / (np.linalg.norm(v) or 1.0)
                directions[name][layer] = (u, float((b @ u).mean()), float((a @ u).mean()))
            x = np.concatenate([a, b])
            y = np.r_[np.ones(len(a)), np.zeros(len(b))]
            probes[layer] = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000,
                                                                               random_state=seed)).fit(x, y)
        return cls(layers, directions, probes, (len(harmful), len(harmless)))

    def read(self, x: np.ndarray, layer: int) -> dict[str, np.ndarray]:
        """The direction and probe readouts of residual vectors ``x`` ``[n, d]`` at ``layer``."""
        out = {}
        for name, per_layer in self.directions.items():
            u, m0, m1 = per_layer[layer]
            out[name] = (x @ u - m0) / (m1 - m0 if m1 != m0 else 1.0)
        out["probe"] = self.probes[layer].decision_function(x)
        return out


@dataclass
class ReplyReadouts:
    """Readouts at every reply position (step 0 = last prompt position, ``k`` = reply token ``k``).

    ``values``: ``[rows, columns]`` float32, one row per (reply, step), columns ``"<readout>@<layer>"``;
    ``reply`` and ``step`` index the rows; ``tokens`` the token at each row; ``replies``: one row per reply
    (group, method, label, request, outcome, completion, n_reply). ``to_frame()`` is the tidy long frame.
    """

    values: Float[np.ndarray, "row column"]
    columns: list[str]
    reply: np.ndarray
    step: np.ndarray
    tokens: list[str]
    replies: Any  # DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.replies)

    def __repr__(self) -> str:
        return (f"ReplyReadouts(replies={len(self)}, rows={len(self.step)}, readouts={self.readouts}, "
                f"layers={self.layers})")

    @property
    def readouts(self) -> list[str]:
        return list(dict.fromkeys(c.split("@")[0] for c in self.columns))

    @property
    def layers(self) -> list[int]:
        return sorted({int(c.split("@")[1]) for c in self.columns})

    def column(self, readout: str, layer: int | None = None) -> str:
        """The column name of ``readout`` at ``layer`` (default: the deepest layer that has it)."""
        have = [c for c in self.columns if c.split("@")[0] == readout]
        if not have:
            raise InputError(f"Unknown readout {readout!r}; these readouts hold {self.readouts}.")
        if layer is None:
            return max(have, key=lambda c: int(c.split("@")[1]))
        name = f"{readout}@{int(layer)}"
        if name not in have:
            raise InputError(f"{readout!r} was not read at layer {layer}; it has layers "
                             f"{sorted(int(c.split('@')[1]) for c in have)}.")
        return name

    def series(self, i: int, readout: str, layer: int | None = None) -> np.ndarray:
        """Reply ``i``'s readout by step (0 .. n_reply)."""
        if not -len(self) <= i < len(self):
            raise InputError(f"reply index {i} is out of range for {len(self)} replies.")
        i %= len(self)
        rows = np.flatnonzero(self.reply == i)
        return self.values[rows, self.columns.index(self.column(readout, layer))].astype(np.float64)

    def summary(self, readout: str = "refusal", layer: int | None = None,
                windows: Sequence[tuple[int, int]] = ((0, 0), (1, 8), (9, 24), (25, 10_000)), by=("group", "outcome")):
        """Mean ``readout`` per ``by`` group (default: set and judged outcome) over step windows (inclusive),
        with the number of replies: one row per group, a column ``"steps a-b"`` per window."""
        import pandas as pd

        j = self.columns.index(self.column(readout, layer))
        keys = self.replies[list(by)].astype(str).agg("/".join, axis=1).to_numpy()[self.reply]
        rows = []
        for key in dict.fromkeys(keys):
            sel = keys == key
            row = {"group": key, "n": int(len(np.unique(self.reply[sel])))}
            for a, b in windows:
                w = sel & (self.step >= a) & (self.step <= b)
                label = f"steps {a}-{b}" if b < 10_000 else f"steps {a}+"
                row[label if a != b else f"step {a}"] = float(self.values[w, j].mean()) if w.any() else float("nan")
            rows.append(row)
        return pd.DataFrame(rows)

    def to_frame(self):
        """Tidy: one row per (reply, step, readout, layer) with group, method, outcome and the token."""
        import pandas as pd

        base = pd.DataFrame({"reply": self.reply, "step": self.step, "token": self.tokens})
        base = base.join(self.replies[["group", "method", "outcome"]], on="reply")
        parts = []
        for j, c in enumerate(self.columns):
            readout, layer = c.split("@")
            parts.append(base.assign(readout=readout, layer=int(layer), value=self.values[:, j].astype(np.float64)))
        return pd.concat(parts, ignore_index=True)

    def plot(self, readout: str = "refusal", layer: int | None = None, by: str = "group", ax=None,
             max_step: int | None = None):
        """Mean readout (95% CI band) vs step for each ``by`` group (see :mod:`.figures`)."""
        return readout_figure(self, readout, layer=layer, by=by, ax=ax, max_step=max_step)

    def view(self, i: int, readout: str = "refusal", layer: int | None = None):
        """A circuitsvis view of reply ``i``, each token coloured by the readout (offline HTML)."""
        return reply_view(self, i, readout, layer=layer)

    def save(self, directory: str | os.PathLike) -> Path:
        meta = {"columns": self.columns, "tokens": self.tokens, "replies": store.frame_to_json(self.replies),
                "meta": self.meta}
        return store.write_artifact(directory, kind=KIND, schema_version=SCHEMA_VERSION, meta=meta,
                                    tensors={"values": self.values.astype(np.float32), "reply": self.reply,
                                             "step": self.step})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ReplyReadouts:
        tensors, meta = store.read_artifact(directory, kind=KIND, schema_version=SCHEMA_VERSION, framework="numpy")
        try:
            return cls(tensors["values"], list(meta["columns"]), tensors["reply"], tensors["step"],
                       list(meta["tokens"]), store.frame_from_json(meta["replies"]), dict(meta["meta"]))
        except KeyError as e:
            raise CacheError(f"{directory}: saved readouts are malformed ({e}); recompute them.") from e


def _lens_mass(model, x: torch.Tensor, ids: Mapping[str, list[int]], chunk: int = 256) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {k: [] for k in ids}
    for s in range(0, x.shape[0], chunk):
        probs = torch.softmax(lens_logits(model, x[s:s + chunk]).float(), dim=-1)
        for k, v in ids.items():
            out[k].append(probs[:, v].sum(-1).cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def _as_groups(replies) -> dict[str, RefusalResult]:
    if isinstance(replies, RefusalResult):
        replies = {replies.prompts.name or "replies": replies}
    groups = dict(replies)
    for name, r in groups.items():
        if not isinstance(r, RefusalResult) or not isinstance(r.recording, ReplyRecording):
            raise InputError(f"Group {name!r}: pass RefusalResults from evaluate_refusal(..., record=layers) "
                             "(their .recording holds the residual stream along the replies).")
        if len(r.recording) != len(r) or r.recording.texts != r.completions:
            raise InputError(f"Group {name!r}: the recording does not belong to these replies.")
    return groups


def reply_readouts(model, replies, basis: ReadoutBasis, *, lens_layers: Sequence[int] = (),
                   tokens: RefusalTokens | None = None) -> ReplyReadouts:
    """Read every reply position of judged, recorded replies (``{group: RefusalResult}``, each from
    ``evaluate_refusal(..., record=...)``, or one result) with ``basis`` and the lens at ``lens_layers``."""
    groups = _as_groups(replies)
    if not sum(len(r) for r in groups.values()):
        raise InputError("No replies to read: every group is empty.")
    layers = list(basis.layers)
    lens_layers = sorted({int(x) for x in lens_layers})
    rec_layers = set.intersection(*(set(r.recording.layers) for r in groups.values()))
    missing = [x for x in set(layers) | set(lens_layers) if x not in rec_layers]
    if missing:
        raise InputError(f"Layers {sorted(missing)} are not in every recording (recorded: {sorted(rec_layers)}).")
    rt = tokens or RefusalTokens.from_tokenizer(model.tokenizer)
    lens_ids = {"lens_refusal": list(rt.refusal_ids), "lens_affirm": list(rt.compliance_ids)}
    rows_meta, xs, reply_idx, steps, toks = [], {x: [] for x in layers + lens_layers}, [], [], []
    for name, r in groups.items():
        rec = r.recording
        for i in range(len(r)):
            start = int(rec.n_recorded_prompt[i]) - 1  # the last prompt position = step 0
            res = rec.resid(i)[start:].float()
            for x in xs:
                xs[x].append(res[:, rec.layers.index(x)])
            reply_idx.append(np.full(res.shape[0], len(rows_meta)))
            steps.append(np.arange(res.shape[0]))
            toks += rec.tokens(i)[start:]
            p = r.prompts[i]
            rows_meta.append({"group": name, "method": p.method or "plain", "label": p.label,
                              "request": p.plain_request, "outcome": str(r.outcomes[i]),
                              "completion": r.completions[i], "n_reply": len(rec.reply_ids[i])})
    columns, values = [], []
    for layer in sorted(set(layers) | set(lens_layers)):
        x = torch.cat(xs[layer]) if xs[layer] else torch.zeros(0, model.d_model)
        if layer in layers:
            for name, v in basis.read(x.numpy().astype(np.float64), layer).items():
                columns.append(f"{name}@{layer}")
                values.append(v)
        if layer in lens_layers:
            for name, v in _lens_mass(model, x, lens_ids).items():
                columns.append(f"{name}@{layer}")
                values.append(v)
    import pandas as pd

    order = sorted(range(len(columns)), key=lambda j: (READOUTS.index(columns[j].split("@")[0]),
                                                         int(columns[j].split("@")[1])))
    return ReplyReadouts(np.stack([values[j] for j in order], axis=1).astype(np.float32), [columns[j] for j in order],
                         np.concatenate(reply_idx), np.concatenate(steps), toks, pd.DataFrame(rows_meta),
                         {"model": model.name, "basis_layers": list(basis.layers), "lens_layers": lens_layers,
                          "n_fit": list(basis.n_fit)})
