"""The result objects: :class:`ProbeResult` (per-layer accuracies, controls, refit probes) and
:class:`TransferResult` (probes applied to other prompts), both saved as :mod:`lens_safety.core.store`
artifacts; :func:`relative_depth_frame` stacks results of several models."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ...capture import Residuals
from ...core import store
from ...core.errors import CacheError, InputError, ModelMismatchError
from ...core.stats import wilson_interval
from ...core.validation import check_same_model
from ..figures import probe_figure, transfer_figure
from .estimators import _CLASSIFIERS, ProbeNotFittedError, _Probe
from .features import _check_finite, _feature_position, _features, _unit, request_groups

SCHEMA_VERSION = 2
ARTIFACT_KIND = "probe_result"


class LayerAccuracy(NamedTuple):
    layer: int
    accuracy: float
    ci_low: float
    ci_high: float


_METRIC_COLUMNS = ["accuracy", "ci_low", "ci_high", "fold_std", "auroc", "auroc_low", "auroc_high", "auroc_fold_std",
                   "shuffled_accuracy", "shuffled_ci_high", "permutation_pvalue", "permutation_null_high",
                   "length_accuracy", "direction_cosine"]


@dataclass
class ProbeResult:
    """Per-layer probe accuracies (with CIs and controls) and the probes refit on all data.

    ``accuracy`` is the pooled out-of-fold accuracy (correct / n over all test folds);
    ``ci_low``/``ci_high`` its 95% Wilson interval. ``auroc`` (binary) is the mean of the per-fold
    AUROCs (scores of different fold models are not on one scale, so they are not pooled), with a
    Hanley–McNeil interval at the full class counts; ``auroc_fold_std`` is its spread over folds.
    ``shuffled_accuracy`` is one CV run with permuted labels; ``permutation_pvalue`` a permutation
    test (NaN at layers where it was not run), ``permutation_null_high`` the 95th percentile of its
    null accuracies. ``length_accuracy`` is a depth-2 decision tree on the prompt's token count
    alone (one number, repeated per layer). ``direction_cosine`` is the cosine between the refit
    probe's weight vector (original feature space, oriented towards ``positive``) and the
    difference-of-means direction ``positive - negative``.

    ``formatting`` (chat / raw, system prompt, template hash) and ``positions`` record the residuals
    the probes were trained on: scoring residuals made otherwise raises :class:`ModelMismatchError`.
    ``request_keys`` (hashes of the training prompts' plain requests) let :meth:`transfer_to`
    refuse test prompts that wrap a request the probes were trained on.
    """

    layers: list[int]
    metrics: dict[str, np.ndarray]
    classes: list[Any]
    classifier: str
    task: str
    n: int
    cv: int
    seed: int
    n_layers: int
    chance: float
    positive: Any = None
    model_name: str = ""
    weights_hash: str = ""
    d_model: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    probes: list[Any] | None = field(default=None, repr=False)
    formatting: dict[str, Any] = field(default_factory=dict)
    positions: str = "last"
    request_keys: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        for k in _METRIC_COLUMNS:  # results from older code or hand-built ones: missing columns are NaN
            if self.metrics and k not in self.metrics:
                self.metrics[k] = np.full(len(self.layers), np.nan)

    # -- views
    def to_frame(self):
        """One row per layer: layer, accuracy, ci_low, ci_high, auroc(+CI), controls, n, classifier, task."""
        import pandas as pd

        df = pd.DataFrame({"layer": self.layers, **{k: self.metrics[k] for k in _METRIC_COLUMNS}})
        df["relative_depth"] = df["layer"] / self.n_layers
        df["n"], df["classifier"], df["task"], df["model"] = self.n, self.classifier, self.task, self.model_name
        return df

    def _row(self, layer: int) -> int:
        if layer not in self.layers:
            raise InputError(f"Layer {layer} was not probed; probed layers: {self.layers}.")
        return self.layers.index(layer)

    def _at(self, i: int) -> LayerAccuracy:
        m = self.metrics
        return LayerAccuracy(self.layers[i], float(m["accuracy"][i]), float(m["ci_low"][i]), float(m["ci_high"][i]))

    def first_layer_above(self, threshold: float = 0.95) -> LayerAccuracy | None:
        """First probed layer whose accuracy is ≥ ``threshold`` (with its CI), or None."""
        acc = self.metrics["accuracy"]
        for i in range(len(self.layers)):
            if acc[i] >= threshold:
                return self._at(i)
        return None

    def best_layer(self) -> LayerAccuracy:
        """The layer with the highest accuracy (the first one on ties), with its CI."""
        return self._at(int(np.nanargmax(self.metrics["accuracy"])))

    @property
    def embedding_at_chance(self) -> bool | None:
        """True if layer 0's accuracy is not significantly above chance (its CI reaches the
        majority-class rate). With a chat template every prompt ends on the same token, so the
        embedding-layer feature is identical and this must hold. None if layer 0 was not probed."""
        if 0 not in self.layers:
            return None
        return bool(self.metrics["ci_low"][self._row(0)] <= self.chance + 1e-12)

    # -- scoring new activations
    def _check_probes(self) -> list[Any]:
        if not self.probes:
            raise ProbeNotFittedError("This ProbeResult holds no fitted probes (run probe_layers with refit=True).")
        return self.probes

    def _check_stage(self, residuals: Residuals) -> None:
        """Same model, same formatting, same feature position as the training residuals."""
        check_same_model(self, residuals, "Cannot apply these probes to these residuals",
                         fix="Capture the residuals with the same model as the probes' training residuals.")
        if self.formatting and residuals.formatting and dict(residuals.formatting) != dict(self.formatting):
            raise ModelMismatchError(
                f"These probes were trained on residuals formatted as {_describe_formatting(self.formatting)}, "
                f"but these residuals are formatted as {_describe_formatting(residuals.formatting)}. A probe "
                "would read the template difference, not the prompt: capture them with the same chat= and "
                "system= settings as the training residuals.")
        pos = _feature_position(residuals.positions)
        if pos != self.positions:
            raise ModelMismatchError(
                f"These probes were trained on the {self.positions!r} position, but these residuals hold "
                f"positions={residuals.positions!r}; capture them with positions={self.positions!r}.")

    def _test_features(self, residuals: Residuals) -> np.ndarray:
        X = _features(residuals)
        self._check_stage(residuals)
        if X.shape[2] != self.d_model or X.shape[1] != self.n_layers + 1:
            raise ModelMismatchError(f"Residuals have {X.shape[1]} layers × d_model {X.shape[2]}, probes expect "
                                     f"{self.n_layers + 1} × {self.d_model}.")
        _check_finite(X, self.layers)
        return X

    def decision_function(self, residuals: Residuals) -> np.ndarray:
        """Refit probes' scores: [n, layers] (binary, >0 means ``classes[1]``) or [n, layers, n_classes]."""
        X = self._test_features(residuals)
        return np.stack([p.decision_function(X[:, layer]) for p, layer in zip(self._check_probes(), self.layers)],
                        axis=1)

    def predict(self, residuals: Residuals) -> np.ndarray:
        """Refit probes' predicted labels: [n, layers] (column i is ``self.layers[i]``)."""
        X = self._test_features(residuals)
        return np.stack([p.predict(X[:, layer]) for p, layer in zip(self._check_probes(), self.layers)], axis=1)

    def weight_directions(self) -> np.ndarray:
        """[layers, d_model] unit weight vectors of the refit binary probes (original space), towards
        ``positive``; NaN rows for probes without one decision vector (MLP, multiclass)."""
        rows = []
        for p in self._check_probes():
            w = p.weight_vector() if hasattr(p, "weight_vector") else getattr(p, "coef_", None)
            w = None if w is None else np.asarray(w, dtype=np.float64).reshape(-1)
            if w is None or w.shape[0] != self.d_model:
                rows.append(np.full(self.d_model, np.nan))
                continue
            sign = 1.0 if self.positive == self.classes[1] else -1.0
            rows.append(sign * _unit(w))
        return np.stack(rows)

    def seen_requests(self, residuals: Residuals) -> np.ndarray:
        """Boolean mask: which prompts of ``residuals`` ask a plain request these probes were trained on."""
        keys = set(self.request_keys)
        return np.asarray([k in keys for k in request_groups(residuals)], dtype=bool)

    def transfer_to(self, residuals: Residuals, positive: Any = None, *, allow_seen: bool = False) -> TransferResult:
        """Apply the refit probes to other residuals (e.g. jailbreak prompts); per layer the
        fraction classified ``positive`` (default: this result's positive class), with a 95% Wilson
        CI, and the accuracy when the test labels are among this result's classes.

        The refit probes saw every training prompt. A test prompt that wraps one of those requests
        (a jailbreak of a training request) would be scored by a probe that memorised it, so it is
        refused with an :class:`InputError` unless ``allow_seen=True``: use
        :func:`probe_transfer`, which cross-fits by request, for a leak-free rate.
        """
        positive = self.positive if positive is None else positive
        if positive not in self.classes:
            raise InputError(f"positive={positive!r} is not a class of these probes ({self.classes}).")
        seen = self.seen_requests(residuals) if self.request_keys else np.zeros(len(residuals), dtype=bool)
        if seen.any() and not allow_seen:
            raise InputError(
                f"{int(seen.sum())} of {len(residuals)} test prompts ask a request these probes were trained on "
                "(e.g. jailbreaks of training requests): their score is inflated by memorisation. Use "
                "probe_transfer(train_residuals, test_residuals), which scores each request with probes that "
                "never saw it, or pass allow_seen=True to measure the leaky number on purpose.")
        pred = self.predict(residuals)
        out = _transfer_result(pred, np.asarray(residuals.labels), self, positive, residuals.prompts.name)
        out.n_seen, out.holdout = int(seen.sum()), "none"
        return out

    # -- plotting
    def plot(self, ax=None, others: Sequence[ProbeResult] | Mapping[str, ProbeResult] = (),
             relative_depth: bool = False, label: str | None = None, controls: bool = True):
        """Accuracy vs layer with 95% CI bands and control lines; overlay ``others``. Returns the Figure
        (drawn by :func:`lens_safety.analyses.figures.probe_figure`)."""
        return probe_figure(self, ax=ax, others=others, relative_depth=relative_depth, label=label,
                            controls=controls)

    # -- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """One artifact folder (``tensors.safetensors`` with the per-layer weights in float64 +
        ``meta.json``), written atomically and checksummed by :mod:`lens_safety.core.store`."""
        tensors: dict[str, np.ndarray] = {}
        kinds = []
        for layer, p in zip(self.layers, self.probes or []):
            if not isinstance(p, _Probe):
                raise InputError(f"Only lens_safety probes can be saved (no pickle); layer {layer} holds a "
                                 f"{type(p).__name__}. Use classifier='svm', 'logistic', 'mlp' or 'diffmeans'.")
            kinds.append(p.kind)
            for k, v in p._state().items():
                tensors[f"layer{layer}.{k}"] = np.ascontiguousarray(v, dtype=np.float64)
        meta = {
            "layers": self.layers, "classes": self.classes, "classifier": self.classifier, "task": self.task,
            "n": self.n, "cv": self.cv, "seed": self.seed, "n_layers": self.n_layers, "chance": self.chance,
            "positive": self.positive, "model_name": self.model_name, "weights_hash": self.weights_hash,
            "d_model": self.d_model, "params": self.params, "probe_kinds": kinds,
            "probe_params": [p.get_params() for p in self.probes or []],
            "metrics": {k: np.asarray(v, dtype=np.float64) for k, v in self.metrics.items()},
            "formatting": self.formatting, "positions": self.positions, "request_keys": self.request_keys,
        }
        return store.write_artifact(directory, kind=ARTIFACT_KIND, schema_version=SCHEMA_VERSION, meta=meta,
                                    tensors=tensors)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ProbeResult:
        """Load what :meth:`save` wrote; the probes score new residuals exactly as before.

        Raises :class:`~lens_safety.core.errors.CacheError` when the folder is missing, truncated or edited.
        """
        tensors, meta = store.read_artifact(directory, kind=ARTIFACT_KIND, schema_version=SCHEMA_VERSION,
                                            framework="numpy")
        try:
            classes = np.asarray(meta["classes"])
            probes = []
            for layer, kind, params in zip(meta["layers"], meta["probe_kinds"], meta["probe_params"]):
                prefix = f"layer{layer}."
                state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                probes.append(_CLASSIFIERS[kind]._from_state(params, classes, state))
            metrics = {k: np.array([np.nan if x is None else x for x in v], dtype=np.float64)
                       for k, v in meta["metrics"].items()}
            return cls(layers=meta["layers"], metrics=metrics, classes=meta["classes"],
                       classifier=meta["classifier"], task=meta["task"], n=meta["n"], cv=meta["cv"],
                       seed=meta["seed"], n_layers=meta["n_layers"], chance=meta["chance"],
                       positive=meta["positive"], model_name=meta["model_name"], weights_hash=meta["weights_hash"],
                       d_model=meta["d_model"], params=meta["params"], probes=probes or None,
                       formatting=meta["formatting"], positions=meta["positions"],
                       request_keys=list(meta["request_keys"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{directory} is not a readable ProbeResult ({type(e).__name__}: {e}); "
                             "re-run probe_layers and save again.") from e


def _describe_formatting(f: Mapping[str, Any]) -> str:
    if not f:
        return "unknown"
    tpl = f.get("template_sha256")
    return (f"chat={f.get('chat')}, system={f.get('system')!r}, template={tpl[:12] if tpl else None}")


def _default_label(r: ProbeResult) -> str:
    return f"{r.model_name or 'model'} · {r.classifier}"


@dataclass
class TransferResult:
    """Probes trained on one set applied to another: per layer, the fraction of test prompts
    classified ``positive`` (95% Wilson CI), and the accuracy when test labels are known classes.

    ``holdout`` says how test prompts that ask a training request were handled: ``"crossfit"``
    (scored by probes trained without that request), ``"exclude"`` (those requests dropped from
    training), ``"none"`` (no check; leaky when ``n_seen > 0``). ``n_seen`` counts such prompts.
    """

    layers: list[int]
    positive_rate: np.ndarray
    rate_low: np.ndarray
    rate_high: np.ndarray
    accuracy: np.ndarray
    acc_low: np.ndarray
    acc_high: np.ndarray
    positive: Any
    n: int
    test_name: str
    n_layers: int
    classifier: str
    model_name: str = ""
    holdout: str = "none"
    n_seen: int = 0

    def to_frame(self):
        """One row per layer: positive_rate (+CI), accuracy (+CI), relative depth, n, holdout, n_seen."""
        import pandas as pd

        return pd.DataFrame({
            "layer": self.layers, "positive_rate": self.positive_rate, "rate_low": self.rate_low,
            "rate_high": self.rate_high, "accuracy": self.accuracy, "acc_low": self.acc_low,
            "acc_high": self.acc_high, "relative_depth": np.asarray(self.layers) / self.n_layers,
            "n": self.n, "positive": self.positive, "test": self.test_name, "classifier": self.classifier,
            "holdout": self.holdout, "n_seen": self.n_seen,
        })

    def plot(self, ax=None, relative_depth: bool = False, label: str | None = None):
        """Fraction classified ``positive`` per layer with its CI band. Returns the Figure
        (drawn by :func:`lens_safety.analyses.figures.transfer_figure`)."""
        return transfer_figure(self, ax=ax, relative_depth=relative_depth, label=label)

    _ARRAYS = ("positive_rate", "rate_low", "rate_high", "accuracy", "acc_low", "acc_high")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the result as a :mod:`lens_safety.core.store` artifact (per-layer numbers in safetensors, the
        rest JSON).

        >>> import tempfile, numpy as np
        >>> a = np.array([0.5, 0.9])
        >>> r = TransferResult([1, 2], a, a, a, a, a, a, "harmful", 10, "jailbreak", 2, "svm")
        >>> TransferResult.load(r.save(tempfile.mkdtemp() + "/t")).to_frame().equals(r.to_frame())
        True
        """
        meta = {"layers": [int(x) for x in self.layers], "positive": self.positive, "n": int(self.n),
                "test_name": self.test_name, "n_layers": int(self.n_layers), "classifier": self.classifier,
                "model_name": self.model_name, "holdout": self.holdout, "n_seen": int(self.n_seen)}
        return store.write_artifact(directory, kind="TransferResult", schema_version=SCHEMA_VERSION, meta=meta,
                                    tensors={k: np.asarray(getattr(self, k), dtype=np.float64) for k in self._ARRAYS})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TransferResult:
        """Load what :meth:`save` wrote; :class:`~lens_safety.core.errors.CacheError` if it is missing or damaged."""
        t, meta = store.read_artifact(directory, kind="TransferResult", schema_version=SCHEMA_VERSION,
                                      framework="numpy")
        try:
            layers = [int(x) for x in meta["layers"]]
            arrays = [t[k] for k in cls._ARRAYS]
            if any(a.shape != (len(layers),) for a in arrays):
                raise ValueError("the per-layer arrays do not match the layers")
            return cls(layers, *arrays, meta["positive"], int(meta["n"]), meta["test_name"], int(meta["n_layers"]),
                       meta["classifier"], meta["model_name"], meta["holdout"], int(meta["n_seen"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{directory}: saved TransferResult is malformed ({e}); delete it and recompute.") from e


def _transfer_result(pred: np.ndarray, y_test: np.ndarray, result: ProbeResult, positive: Any,
                     test_name: str) -> TransferResult:
    n = pred.shape[0]
    k = (pred == positive).sum(0)
    lo, hi = wilson_interval(k, n)
    L = len(result.layers)
    acc, acc_lo, acc_hi = np.full(L, np.nan), np.full(L, np.nan), np.full(L, np.nan)
    known = np.isin(y_test, np.asarray(result.classes))
    if known.all():
        kc = (pred == y_test[:, None]).sum(0)
        acc = kc / n
        acc_lo, acc_hi = wilson_interval(kc, n)
    return TransferResult(list(result.layers), k / n, lo, hi, np.asarray(acc, dtype=float), np.asarray(acc_lo),
                          np.asarray(acc_hi), positive, n, test_name, result.n_layers, result.classifier,
                          result.model_name)


def relative_depth_frame(results: Mapping[str, ProbeResult] | Sequence[ProbeResult]):
    """Stack several results (e.g. different models) on relative depth ``layer / n_layers``.

    Returns the concatenated :meth:`ProbeResult.to_frame` rows with a ``name`` column; plot
    with ``results[0].plot(others=results[1:], relative_depth=True)``.
    """
    import pandas as pd

    items = results.items() if isinstance(results, Mapping) else [(_default_label(r), r) for r in results]
    frames = []
    for name, r in items:
        df = r.to_frame()
        df.insert(0, "name", name)
        frames.append(df)
    if not frames:
        raise InputError("relative_depth_frame needs at least one ProbeResult.")
    return pd.concat(frames, ignore_index=True)
