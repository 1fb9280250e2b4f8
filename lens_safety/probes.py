"""Per-layer weak classifiers ("probes") on the residual stream, with CV, CIs and controls.

The paper's claim 1: a linear SVM (or a one-hidden-layer MLP of 100 units) trained on the
last-position residual of each layer separates harmful from harmless prompts within the
first few layers. :func:`probe_layers` fits one estimator per layer with stratified k-fold
cross-validation and reports, per layer, the pooled out-of-fold accuracy with a 95% Wilson
interval, AUROC with a Hanley–McNeil interval (binary tasks), a shuffled-label control, a
length-only control and the cosine between the probe's weight vector and the
difference-of-means direction.

Layers are indexed ``0..n_layers``: 0 is the embedding output and ``l`` the raw output of
block ``l-1`` (HF ``hidden_states`` numbering, but the last entry has no final norm). With a
chat template the last position is the template's final token, identical for every prompt, so
layer 0 must sit at chance: :attr:`ProbeResult.embedding_at_chance` checks it.

The estimators follow scikit-learn conventions (constructor parameters only, ``fit`` returns
``self``, fitted state ends in ``_``) and work inside ``Pipeline``, ``clone`` and
``cross_val_score``. Their fitted state is a few arrays, so results save to safetensors + JSON
(no pickle) and score new activations after loading.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X, y = rng.normal(size=(40, 5)), np.array(["a", "b"] * 20)
>>> X[y == "b", 0] += 4
>>> float(DiffMeansProbe().fit(X, y).score(X, y)) > 0.9
True
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Float
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.exceptions import NotFittedError as _SkNotFittedError
from torch import Tensor

from .activations import Residuals
from .errors import InputError, ModelMismatchError
from .errors import NotFittedError as _LsNotFittedError

__all__ = [
    "ProbeNotFittedError", "LinearSVMProbe", "LogisticProbe", "MLPProbe", "DiffMeansProbe",
    "probe_layers", "ProbeResult", "LayerAccuracy", "TransferResult", "probe_transfer", "transfer_to",
    "refusal_directions", "relative_depth_frame", "wilson_interval", "auroc_interval",
]

SCHEMA_VERSION = 1
Z95 = 1.959963984540054


class ProbeNotFittedError(_LsNotFittedError, _SkNotFittedError):
    """A probe was used before ``fit``: both lens_safety's and scikit-learn's NotFittedError."""


# -- statistics ---------------------------------------------------------------------------

def wilson_interval(k: np.ndarray | int, n: np.ndarray | int, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """95% Wilson score interval of a proportion ``k / n`` (stays inside [0, 1], sane at 0 and 1).

    >>> lo, hi = wilson_interval(50, 100)
    >>> round(float(lo), 3), round(float(hi), 3)
    (0.404, 0.596)
    """
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def auroc_interval(auc: float, n_pos: int, n_neg: int, z: float = Z95) -> tuple[float, float]:
    """95% normal interval of an AUROC with the Hanley & McNeil (1982) standard error.

    >>> [round(v, 3) for v in auroc_interval(0.8, 50, 50)]
    [0.713, 0.887]
    """
    a = float(auc)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    se = math.sqrt(max(var, 0.0))
    return max(0.0, a - z * se), min(1.0, a + z * se)


# -- estimators ---------------------------------------------------------------------------

def _as_2d(X: Any) -> np.ndarray:
    if isinstance(X, Tensor):
        X = X.detach().cpu().numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise InputError(f"Expected features of shape [n_samples, n_features], got shape {X.shape}.")
    return X


class _Probe(ClassifierMixin, BaseEstimator):
    """Shared predict/score logic; subclasses implement ``_fit``, ``decision_function``, ``_state``."""

    kind = ""

    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise ProbeNotFittedError(f"This {type(self).__name__} is not fitted yet; call fit(X, y) first.")

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "classes_")

    def fit(self, X, y):
        X = _as_2d(X)
        y = np.asarray(y)
        if y.shape[0] != X.shape[0]:
            raise InputError(f"X has {X.shape[0]} rows but y has {y.shape[0]} labels; pass one label per row.")
        classes = np.unique(y)
        if len(classes) < 2:
            raise InputError(f"Need at least two classes to fit a probe, got only {classes.tolist()}.")
        self.classes_ = classes
        self.n_features_in_ = X.shape[1]
        self._fit(X, y)
        return self

    def _check_X(self, X) -> np.ndarray:
        self._check_fitted()
        X = _as_2d(X)
        if X.shape[1] != self.n_features_in_:
            raise InputError(f"{type(self).__name__} was fitted on {self.n_features_in_} features, "
                             f"got {X.shape[1]}.")
        return X

    def predict(self, X) -> np.ndarray:
        s = self.decision_function(X)
        if s.ndim == 1:
            return self.classes_[(s > 0).astype(int)]
        return self.classes_[s.argmax(1)]

    def weight_vector(self) -> np.ndarray | None:
        """The binary decision direction in the original (unscaled) feature space, or None."""
        return None

    # -- persistence hooks (arrays only; see ProbeResult.save)
    def _state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def _from_state(cls, params: dict[str, Any], classes: np.ndarray, state: dict[str, np.ndarray]) -> _Probe:
        est = cls(**params)
        est.classes_ = classes
        for k, v in state.items():
            setattr(est, k + "_", v)
        est.n_features_in_ = int(state["mean"].shape[0] if "mean" in state else state["direction"].shape[0])
        return est


class _LinearProbe(_Probe):
    """StandardScaler followed by a linear sklearn classifier; fitted arrays kept explicitly."""

    def _make(self):
        raise NotImplementedError

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(X)
        clf = self._make().fit(scaler.transform(X), y)
        self.mean_, self.scale_ = scaler.mean_, scaler.scale_
        self.coef_ = np.asarray(clf.coef_, dtype=np.float64)
        self.intercept_ = np.asarray(clf.intercept_, dtype=np.float64).reshape(-1)

    def decision_function(self, X) -> np.ndarray:
        X = self._check_X(X)
        s = ((X - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_
        return s[:, 0] if s.shape[1] == 1 else s

    def weight_vector(self) -> np.ndarray | None:
        self._check_fitted()
        if self.coef_.shape[0] != 1:
            return None
        return self.coef_[0] / self.scale_  # w·((x-m)/s) = (w/s)·x + const

    def _state(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean_, "scale": self.scale_, "coef": self.coef_, "intercept": self.intercept_}


class LinearSVMProbe(_LinearProbe):
    """Standardise, then ``LinearSVC`` (the paper's SVM). Multiclass is one-vs-rest.

    ``C`` defaults to 0.01, not sklearn's 1.0: with fewer prompts than dimensions (hundreds vs
    896) the standardised data are always separable and C=1 is a near hard margin. On the default
    model (harmbench vs harmless, 5-fold) C=0.01 is as accurate or better at every layer and
    liblinear converges about 4× faster. Pass ``C=1.0`` for sklearn's default.

    >>> import numpy as np
    >>> X = np.r_[np.zeros((5, 2)), np.ones((5, 2))]; y = [0] * 5 + [1] * 5
    >>> LinearSVMProbe().fit(X, y).predict([[0.9, 1.1]]).tolist()
    [1]
    """

    kind = "svm"

    def __init__(self, C: float = 0.01, max_iter: int = 2000, tol: float = 1e-4, class_weight=None,
                 random_state: int | None = 0):
        self.C, self.max_iter, self.tol = C, max_iter, tol
        self.class_weight, self.random_state = class_weight, random_state

    def _make(self):
        from sklearn.svm import LinearSVC

        return LinearSVC(C=self.C, dual="auto", max_iter=self.max_iter, tol=self.tol,
                         class_weight=self.class_weight, random_state=self.random_state)


class LogisticProbe(_LinearProbe):
    """Standardise, then L2 logistic regression (lbfgs; multinomial when multiclass)."""

    kind = "logistic"

    def __init__(self, C: float = 1.0, max_iter: int = 200, tol: float = 1e-4, class_weight=None):
        self.C, self.max_iter, self.tol, self.class_weight = C, max_iter, tol, class_weight

    def _make(self):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol, class_weight=self.class_weight)


class MLPProbe(_Probe):
    """Standardise, then an MLP with one hidden ReLU layer (100 units, as the paper)."""

    kind = "mlp"

    def __init__(self, hidden: int = 100, alpha: float = 1e-4, max_iter: int = 200, learning_rate_init: float = 1e-3,
                 random_state: int | None = 0):
        self.hidden, self.alpha, self.max_iter = hidden, alpha, max_iter
        self.learning_rate_init, self.random_state = learning_rate_init, random_state

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        from sklearn.neural_network import MLPClassifier
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(X)
        mlp = MLPClassifier(hidden_layer_sizes=(self.hidden,), alpha=self.alpha, max_iter=self.max_iter,
                            learning_rate_init=self.learning_rate_init, random_state=self.random_state)
        mlp.fit(scaler.transform(X), y)
        self.mean_, self.scale_ = scaler.mean_, scaler.scale_
        self.W0_, self.W1_ = (np.asarray(w, dtype=np.float64) for w in mlp.coefs_)
        self.b0_, self.b1_ = (np.asarray(b, dtype=np.float64) for b in mlp.intercepts_)

    def decision_function(self, X) -> np.ndarray:
        """Output-layer logits: [n] for binary (>0 means ``classes_[1]``), else [n, n_classes]."""
        X = self._check_X(X)
        h = np.maximum(((X - self.mean_) / self.scale_) @ self.W0_ + self.b0_, 0.0)
        s = h @ self.W1_ + self.b1_
        return s[:, 0] if s.shape[1] == 1 else s

    def _state(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean_, "scale": self.scale_, "W0": self.W0_, "b0": self.b0_,
                "W1": self.W1_, "b1": self.b1_}


class DiffMeansProbe(_Probe):
    """Binary: project on the unit difference of class means, threshold at the midpoint.

    ``direction_`` points from ``classes_[0]``'s mean to ``classes_[1]``'s; ``threshold_`` is
    the midpoint of the two projected class means. No scaling: the raw feature space.
    """

    kind = "diffmeans"

    def __init__(self):
        pass

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        if len(self.classes_) != 2:
            raise InputError(f"DiffMeansProbe is binary; got {len(self.classes_)} classes "
                             f"{self.classes_.tolist()}. Use classifier='svm' or 'logistic' for multiclass.")
        m0, m1 = X[y == self.classes_[0]].mean(0), X[y == self.classes_[1]].mean(0)
        diff = m1 - m0
        norm = float(np.linalg.norm(diff))
        self.direction_ = diff / norm if norm > 0 else diff
        if norm > 0:
            self.threshold_ = np.array([0.5 * float((m0 + m1) @ self.direction_)])
        else:  # identical class means: no direction; predict the majority class
            self.threshold_ = np.array([-1.0 if (y == self.classes_[1]).sum() > (y == self.classes_[0]).sum() else 1.0])

    def decision_function(self, X) -> np.ndarray:
        X = self._check_X(X)
        return X @ self.direction_ - self.threshold_[0]

    def weight_vector(self) -> np.ndarray:
        self._check_fitted()
        return self.direction_

    def _state(self) -> dict[str, np.ndarray]:
        return {"direction": self.direction_, "threshold": self.threshold_}


_CLASSIFIERS: dict[str, type[_Probe]] = {c.kind: c for c in (LinearSVMProbe, LogisticProbe, MLPProbe, DiffMeansProbe)}


def _make_estimator(classifier: str | BaseEstimator) -> tuple[BaseEstimator, str]:
    if isinstance(classifier, str):
        if classifier not in _CLASSIFIERS:
            raise InputError(f"classifier must be one of {sorted(_CLASSIFIERS)} or an sklearn estimator, "
                             f"got {classifier!r}.")
        return _CLASSIFIERS[classifier](), classifier
    if not (hasattr(classifier, "fit") and hasattr(classifier, "predict")):
        raise InputError(f"classifier must be a name or an estimator with fit/predict, got {type(classifier)}.")
    kind = getattr(classifier, "kind", "") or type(classifier).__name__
    return classifier, kind


# -- features and validation ----------------------------------------------------------------

def _features(residuals: Residuals) -> np.ndarray:
    """[n, n_layers+1, d_model] float32. For ``positions=k`` residuals, the last of the k positions."""
    if not isinstance(residuals, Residuals):
        raise InputError(f"Expected a Residuals (from collect_residuals), got {type(residuals).__name__}.")
    v = residuals.values
    if v.ndim == 4:
        v = v[:, :, -1]
    return v.detach().float().cpu().numpy()


def _check_finite(X: np.ndarray, layers: Sequence[int]) -> None:
    bad = [layer for layer in layers if not np.isfinite(X[:, layer]).all()]
    if bad:
        raise InputError(f"Activations contain NaN or inf at layer(s) {bad} (0 = embedding output); "
                         "recapture them (e.g. in float32) or drop those layers with layers=[...].")


def _resolve_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers + 1))
    out = []
    for layer in layers:
        if not -(n_layers + 1) <= int(layer) <= n_layers:
            raise InputError(f"layer must be in 0..{n_layers} (0 = embedding output), got {layer}.")
        out.append(int(layer) % (n_layers + 1))
    return out


def _check_labels(labels: Sequence[Any], n: int, cv: int | None) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(list(labels))
    if y.shape[0] != n:
        raise InputError(f"Got {y.shape[0]} labels for {n} activation rows; pass one label per prompt.")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise InputError(f"Need at least two classes to probe, got only {classes.tolist()}; "
                         "concatenate residuals of both sets (e.g. harmful + harmless).")
    if cv is not None and counts.min() < cv:
        small = {str(c): int(k) for c, k in zip(classes, counts) if k < cv}
        raise InputError(f"cv={cv} folds need at least {cv} samples per class; too few in {small}. "
                         "Add prompts or lower cv.")
    return y, classes


# -- the per-layer work ---------------------------------------------------------------------

def _cv_layer(est, X: np.ndarray, y: np.ndarray, splits, classes: np.ndarray):
    """Out-of-fold predictions and (binary) scores, plus per-fold accuracies."""
    pred = np.empty(len(y), dtype=y.dtype)
    score = np.full(len(y), np.nan)
    fold_acc = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for train, test in splits:
            m = clone(est).fit(X[train], y[train])
            pred[test] = m.predict(X[test])
            if len(classes) == 2 and hasattr(m, "decision_function"):
                score[test] = m.decision_function(X[test])
            fold_acc.append(float(np.mean(pred[test] == y[test])))
    return pred, score, np.array(fold_acc)


def _fit_full(est, X: np.ndarray, y: np.ndarray):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clone(est).fit(X, y)


def _layer_job(est, X_l: np.ndarray, y: np.ndarray, y_perm: np.ndarray | None, splits, splits_perm,
               classes: np.ndarray, refit: bool):
    X_l = np.ascontiguousarray(X_l, dtype=np.float64)
    out = {"cv": _cv_layer(est, X_l, y, splits, classes)}
    if y_perm is not None:
        out["shuffled"] = _cv_layer(est, X_l, y_perm, splits_perm, classes)
    if refit:
        out["probe"] = _fit_full(est, X_l, y)
    return out


def _run_layers(fn, args_per_layer: list[tuple], n_jobs: int | None, progress: bool, desc: str) -> list:
    if n_jobs in (None, 1):
        it = (fn(*a) for a in args_per_layer)
    else:
        from joblib import Parallel, delayed

        it = Parallel(n_jobs=n_jobs, return_as="generator", prefer="threads")(delayed(fn)(*a) for a in args_per_layer)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(args_per_layer), desc=desc, unit="layer")
    return list(it)


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, n, out=np.zeros_like(v), where=n > 0)


def _diff_means(X: np.ndarray, y: np.ndarray, positive: Any, negative: Any) -> np.ndarray:
    """[layers, d] unit vectors mean(positive) - mean(negative), in float64."""
    pos, neg = X[y == positive].astype(np.float64), X[y == negative].astype(np.float64)
    return _unit(pos.mean(0) - neg.mean(0))


def refusal_directions(residuals: Residuals, positive: str = "harmful", negative: str = "harmless",
                       labels: Sequence[str] | None = None) -> Float[Tensor, "layer d_model"]:
    """Per-layer unit difference-of-means direction ``mean(positive) - mean(negative)``.

    Row ``l`` is residual layer ``l`` (0 = embedding output, l = raw output of block l-1).
    A layer whose class means coincide (e.g. the embedding at the chat template's last token)
    gets a zero vector.

    >>> import lens_safety as ls, torch
    >>> from lens_safety.prompts import PromptSet
    >>> ps = PromptSet.from_texts(["a", "b"], label="harmful") + PromptSet.from_texts(["c", "d"], label="harmless")
    >>> v = torch.zeros(4, 2, 3); v[:2, 1, 0] = 1.0
    >>> r = ls.Residuals(v, ps, torch.ones(4, dtype=torch.long), "m", "h", "last")
    >>> refusal_directions(r)[1].tolist()
    [1.0, 0.0, 0.0]
    """
    X = _features(residuals)
    y = np.asarray(list(labels) if labels is not None else residuals.labels)
    if y.shape[0] != X.shape[0]:
        raise InputError(f"Got {y.shape[0]} labels for {X.shape[0]} activation rows.")
    for lab in (positive, negative):
        if not (y == lab).any():
            raise InputError(f"No prompt has label {lab!r}; labels present: {sorted(set(y.tolist()))}.")
    _check_finite(X, range(X.shape[1]))
    return torch.from_numpy(_diff_means(X, y, positive, negative).astype(np.float32))


# -- results ---------------------------------------------------------------------------------

class LayerAccuracy(NamedTuple):
    layer: int
    accuracy: float
    ci_low: float
    ci_high: float


_METRIC_COLUMNS = ["accuracy", "ci_low", "ci_high", "fold_std", "auroc", "auroc_low", "auroc_high",
                   "shuffled_accuracy", "shuffled_ci_high", "length_accuracy", "direction_cosine"]


@dataclass
class ProbeResult:
    """Per-layer probe accuracies (with CIs and controls) and the probes refit on all data.

    ``accuracy`` is the pooled out-of-fold accuracy (correct / n over all k test folds);
    ``ci_low``/``ci_high`` its 95% Wilson interval; ``auroc`` (binary) uses pooled
    out-of-fold decision scores, with a Hanley–McNeil interval. ``shuffled_accuracy`` is the
    same CV with permuted labels; ``length_accuracy`` a depth-2 decision tree on the prompt's
    token count alone (one number, repeated per layer). ``direction_cosine`` is the cosine
    between the refit probe's weight vector (original feature space, oriented towards
    ``positive``) and the difference-of-means direction ``positive - negative``.
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

    def first_layer_above(self, threshold: float = 0.95) -> LayerAccuracy | None:
        """First probed layer whose accuracy is ≥ ``threshold`` (with its CI), or None."""
        acc = self.metrics["accuracy"]
        for i, layer in enumerate(self.layers):
            if acc[i] >= threshold:
                return LayerAccuracy(layer, float(acc[i]), float(self.metrics["ci_low"][i]),
                                     float(self.metrics["ci_high"][i]))
        return None

    def best_layer(self) -> LayerAccuracy:
        i = int(np.argmax(self.metrics["accuracy"]))
        return LayerAccuracy(self.layers[i], float(self.metrics["accuracy"][i]), float(self.metrics["ci_low"][i]),
                             float(self.metrics["ci_high"][i]))

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

    def _test_features(self, residuals: Residuals) -> np.ndarray:
        X = _features(residuals)
        if self.weights_hash and residuals.weights_hash != self.weights_hash:
            raise ModelMismatchError(f"These probes were fitted on {self.model_name} ({self.weights_hash[:12]}) "
                                     f"but the residuals come from {residuals.model_name} "
                                     f"({residuals.weights_hash[:12]}); capture them with the same model.")
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

    def transfer_to(self, residuals: Residuals, positive: Any = None) -> TransferResult:
        """Apply the refit probes to other residuals (e.g. jailbreak prompts); per layer the
        fraction classified ``positive`` (default: this result's positive class), with a 95% Wilson
        CI, and the accuracy when the test labels are among this result's classes."""
        positive = self.positive if positive is None else positive
        if positive not in self.classes:
            raise InputError(f"positive={positive!r} is not a class of these probes ({self.classes}).")
        pred = self.predict(residuals)
        return _transfer_result(pred, np.asarray(residuals.labels), self, positive, residuals.prompts.name)

    # -- plotting
    def plot(self, ax=None, others: Sequence[ProbeResult] | Mapping[str, ProbeResult] = (),
             relative_depth: bool = False, label: str | None = None, controls: bool = True):
        """Accuracy vs layer with 95% CI bands and control lines; overlay ``others``. Returns the Figure."""
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=(7, 4))
        else:
            fig = ax.figure
        items = [(label or _default_label(self), self)]
        items += list(others.items()) if isinstance(others, Mapping) else [(_default_label(o), o) for o in others]
        for name, r in items:
            x = np.asarray(r.layers, dtype=float) / (r.n_layers if relative_depth else 1)
            line, = ax.plot(x, r.metrics["accuracy"], marker="o", ms=3, label=name)
            ax.fill_between(x, r.metrics["ci_low"], r.metrics["ci_high"], color=line.get_color(), alpha=0.2)
            if controls:
                ax.plot(x, r.metrics["shuffled_accuracy"], ls="--", lw=1, color=line.get_color(), alpha=0.7,
                        label=f"{name}: shuffled labels")
                if np.isfinite(r.metrics["length_accuracy"]).any():
                    ax.plot(x, r.metrics["length_accuracy"], ls=":", lw=1, color=line.get_color(), alpha=0.7,
                            label=f"{name}: length only")
        ax.axhline(self.chance, color="grey", lw=0.8, label="chance (majority class)")
        ax.set_xlabel("relative depth (layer / n_layers)" if relative_depth else "layer (0 = embedding output)")
        ax.set_ylabel(f"{self.cv}-fold CV accuracy")
        ax.set_ylim(min(0.3, ax.get_ylim()[0]), 1.02)
        ax.set_title(f"Probe accuracy per layer: {self.task}")
        ax.legend(fontsize=7)
        return fig

    # -- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """``probes.safetensors`` (per-layer weights, float64) + ``meta.json``; written atomically."""
        from safetensors.numpy import save_file

        directory = Path(directory)
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
            "schema_version": SCHEMA_VERSION, "layers": self.layers, "classes": _jsonable(self.classes),
            "classifier": self.classifier, "task": self.task, "n": self.n, "cv": self.cv, "seed": self.seed,
            "n_layers": self.n_layers, "chance": self.chance, "positive": _jsonable(self.positive),
            "model_name": self.model_name, "weights_hash": self.weights_hash, "d_model": self.d_model,
            "params": _jsonable(self.params), "probe_kinds": kinds,
            "probe_params": [p.get_params() for p in self.probes or []],
            "metrics": {k: [None if not np.isfinite(x) else float(x) for x in v] for k, v in self.metrics.items()},
        }
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if tensors:
            save_file(tensors, str(tmp / "probes.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ProbeResult:
        """Load what :meth:`save` wrote; the probes score new residuals exactly as before."""
        from safetensors.numpy import load_file

        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise InputError(f"{directory} is not a saved ProbeResult (no meta.json).")
        meta = json.loads(meta_path.read_text())
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise InputError(f"{directory} has schema {meta.get('schema_version')}, expected {SCHEMA_VERSION}.")
        tensors = load_file(str(directory / "probes.safetensors")) if meta["probe_kinds"] else {}
        classes = np.asarray(meta["classes"])
        probes = []
        for layer, kind, params in zip(meta["layers"], meta["probe_kinds"], meta["probe_params"]):
            prefix = f"layer{layer}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            probes.append(_CLASSIFIERS[kind]._from_state(params, classes, state))
        metrics = {k: np.array([np.nan if x is None else x for x in v], dtype=np.float64)
                   for k, v in meta["metrics"].items()}
        return cls(layers=meta["layers"], metrics=metrics, classes=meta["classes"], classifier=meta["classifier"],
                   task=meta["task"], n=meta["n"], cv=meta["cv"], seed=meta["seed"], n_layers=meta["n_layers"],
                   chance=meta["chance"], positive=meta["positive"], model_name=meta["model_name"],
                   weights_hash=meta["weights_hash"], d_model=meta["d_model"], params=meta["params"],
                   probes=probes or None)


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _default_label(r: ProbeResult) -> str:
    return f"{r.model_name or 'model'} · {r.classifier}"


# -- the driver ---------------------------------------------------------------------------

def probe_layers(residuals: Residuals, labels: Sequence[Any] | None = None, classifier: str | BaseEstimator = "svm",
                 cv: int = 5, seed: int = 0, layers: Sequence[int] | None = None, controls: bool = True,
                 n_jobs: int | None = None, progress: bool = True, *, positive: Any = None, task: str | None = None,
                 refit: bool = True) -> ProbeResult:
    """Fit one probe per residual layer with stratified k-fold CV; accuracies, CIs and controls.

    Features are the residual at the captured position (``positions="last"``: the chat
    template's final token); for ``positions=k`` residuals the last of the k positions is used.
    Layers are ``0..n_layers`` (0 = embedding output, l = raw output of block l-1).
    ``classifier``: ``"svm"`` (the paper's), ``"logistic"``, ``"mlp"`` (100 hidden units),
    ``"diffmeans"`` (binary) or any sklearn classifier instance. ``labels`` default to
    ``residuals.labels``: two classes for the 2-way task, three (harmless / harmful /
    jailbreak) for the 3-way one. ``positive`` (binary) is the class the directions point to
    (default ``"harmful"`` if present, else the second class). ``controls`` adds the
    shuffled-label CV (doubles the cost) and the length-only baseline. ``refit`` keeps a probe
    per layer fitted on all data (for :meth:`ProbeResult.predict`, ``transfer_to``, ``save``).

    >>> import lens_safety as ls, torch
    >>> from lens_safety.prompts import PromptSet
    >>> ps = PromptSet.from_texts([f"h{i}" for i in range(10)], label="harmful") + \\
    ...      PromptSet.from_texts([f"s{i}" for i in range(10)], label="harmless")
    >>> v = torch.randn(20, 3, 8, generator=torch.Generator().manual_seed(0)); v[:10, 2, 0] += 5
    >>> r = ls.Residuals(v, ps, torch.full((20,), 7), "m", "h", "last")
    >>> res = ls.probe_layers(r, cv=5, progress=False)
    >>> res.to_frame().accuracy.round(2).tolist()[2]
    1.0
    """
    if isinstance(cv, bool) or not isinstance(cv, int) or cv < 2:
        raise InputError(f"cv must be an int ≥ 2 (number of stratified folds), got {cv!r}.")
    X = _features(residuals)
    n, n_res_layers, d = X.shape
    n_layers = n_res_layers - 1
    y, classes = _check_labels(labels if labels is not None else residuals.labels, n, cv)
    layer_ids = _resolve_layers(layers, n_layers)
    _check_finite(X, layer_ids)
    est, kind = _make_estimator(classifier)
    if kind == "diffmeans" and len(classes) != 2:
        raise InputError(f"classifier='diffmeans' is binary; got {len(classes)} classes {classes.tolist()}.")
    binary = len(classes) == 2
    if positive is None:
        positive = ("harmful" if "harmful" in classes else classes[-1])
    elif positive not in classes:
        raise InputError(f"positive={positive!r} is not among the labels {classes.tolist()}.")
    positive = _jsonable(positive)
    negative = _jsonable(classes[0] if classes[0] != positive else classes[1]) if binary else None

    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    splits = list(skf.split(np.zeros(n), y))
    y_perm = splits_perm = None
    if controls:
        y_perm = np.random.default_rng(seed).permutation(y)
        splits_perm = list(skf.split(np.zeros(n), y_perm))
    jobs = [(est, X[:, layer], y, y_perm, splits, splits_perm, classes, refit) for layer in layer_ids]
    outs = _run_layers(_layer_job, jobs, n_jobs, progress, f"probe {kind}")

    L = len(layer_ids)
    m = {k: np.full(L, np.nan) for k in _METRIC_COLUMNS}
    for i, o in enumerate(outs):
        pred, score, fold_acc = o["cv"]
        k = int((pred == y).sum())
        m["accuracy"][i] = k / n
        m["ci_low"][i], m["ci_high"][i] = wilson_interval(k, n)
        m["fold_std"][i] = float(fold_acc.std(ddof=1))
        if binary and np.isfinite(score).all():
            from sklearn.metrics import roc_auc_score

            pos = y == classes[1]
            m["auroc"][i] = roc_auc_score(pos, score)
            m["auroc_low"][i], m["auroc_high"][i] = auroc_interval(m["auroc"][i], int(pos.sum()), int((~pos).sum()))
        if controls:
            ks = int((o["shuffled"][0] == y_perm).sum())
            m["shuffled_accuracy"][i] = ks / n
            m["shuffled_ci_high"][i] = wilson_interval(ks, n)[1]
    if controls:
        m["length_accuracy"][:] = _length_accuracy(residuals.n_tokens, y, splits, seed)
    probes = [o["probe"] for o in outs] if refit else None
    counts = np.unique(y, return_counts=True)[1]
    result = ProbeResult(
        layers=layer_ids, metrics=m, classes=_jsonable(classes), classifier=kind,
        task=task or "-vs-".join(str(c) for c in classes), n=n, cv=cv, seed=seed, n_layers=n_layers,
        chance=float(counts.max() / n), positive=positive if binary else None,
        model_name=residuals.model_name, weights_hash=residuals.weights_hash, d_model=d,
        params={"positions": residuals.positions, "controls": controls,
                "estimator": _jsonable(est.get_params()) if hasattr(est, "get_params") else {}},
        probes=probes)
    if binary and refit:
        dirs = _diff_means(X[:, layer_ids], y, positive, negative)
        m["direction_cosine"][:] = np.einsum("ld,ld->l", result.weight_directions(), dirs)
    return result


def _length_accuracy(n_tokens: Tensor, y: np.ndarray, splits, seed: int) -> float:
    """Pooled out-of-fold accuracy of a depth-2 decision tree on the token count alone."""
    from sklearn.tree import DecisionTreeClassifier

    t = np.asarray(n_tokens.cpu().numpy() if isinstance(n_tokens, Tensor) else n_tokens, dtype=np.float64)
    t = t.reshape(-1, 1)
    pred = np.empty(len(y), dtype=y.dtype)
    for train, test in splits:
        tree = DecisionTreeClassifier(max_depth=2, random_state=seed).fit(t[train], y[train])
        pred[test] = tree.predict(t[test])
    return float((pred == y).mean())


# -- transfer ---------------------------------------------------------------------------------

@dataclass
class TransferResult:
    """Probes trained on one set applied to another: per layer, the fraction of test prompts
    classified ``positive`` (95% Wilson CI), and the accuracy when test labels are known classes."""

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

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({
            "layer": self.layers, "positive_rate": self.positive_rate, "rate_low": self.rate_low,
            "rate_high": self.rate_high, "accuracy": self.accuracy, "acc_low": self.acc_low,
            "acc_high": self.acc_high, "relative_depth": np.asarray(self.layers) / self.n_layers,
            "n": self.n, "positive": self.positive, "test": self.test_name, "classifier": self.classifier,
        })

    def plot(self, ax=None, relative_depth: bool = False):
        """Fraction classified ``positive`` per layer with its CI band. Returns the Figure."""
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=(7, 4))
        else:
            fig = ax.figure
        x = np.asarray(self.layers, dtype=float) / (self.n_layers if relative_depth else 1)
        line, = ax.plot(x, self.positive_rate, marker="o", ms=3, label=f"{self.test_name}: classified {self.positive}")
        ax.fill_between(x, self.rate_low, self.rate_high, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("relative depth" if relative_depth else "layer (0 = embedding output)")
        ax.set_ylabel(f"fraction classified {self.positive}")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
        return fig


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


def probe_transfer(train_residuals: Residuals, test_residuals: Residuals, positive: str = "harmful",
                   negative: str | None = "harmless", classifier: str | BaseEstimator = "svm",
                   layers: Sequence[int] | None = None, n_jobs: int | None = None,
                   progress: bool = False) -> TransferResult:
    """Train per layer on ``positive`` vs ``negative`` prompts of ``train_residuals`` (all of them,
    no CV), then classify ``test_residuals`` (e.g. jailbreaks, or another dataset).

    Reports per layer the fraction of test prompts classified ``positive`` with a 95% Wilson CI
    (the paper's "jailbreaks cannot fool the early layers"), and the accuracy when the test
    labels are ``positive``/``negative`` (cross-dataset transfer). ``negative=None`` uses every
    other label as the negative class.
    """
    X = _features(train_residuals)
    y = np.asarray(train_residuals.labels)
    if not (y == positive).any():
        raise InputError(f"No training prompt has label {positive!r}; labels: {sorted(set(y.tolist()))}.")
    keep = (y == positive) | (y == negative) if negative is not None else np.ones(len(y), bool)
    if negative is not None and not (y == negative).any():
        raise InputError(f"No training prompt has label {negative!r}; labels: {sorted(set(y.tolist()))}.")
    y = np.where(y[keep] == positive, positive, negative if negative is not None else "other")
    X = X[keep]
    _check_labels(y, len(y), None)
    layer_ids = _resolve_layers(layers, X.shape[1] - 1)
    _check_finite(X, layer_ids)
    est, kind = _make_estimator(classifier)
    probes = _run_layers(_fit_full, [(est, np.ascontiguousarray(X[:, layer], np.float64), y) for layer in layer_ids],
                         n_jobs, progress, f"fit {kind}")
    classes = _jsonable(np.unique(y))
    result = ProbeResult(layers=layer_ids, metrics={}, classes=classes, classifier=kind, task="transfer",
                         n=len(y), cv=0, seed=0, n_layers=X.shape[1] - 1, chance=float("nan"), positive=positive,
                         model_name=train_residuals.model_name,
                         weights_hash=train_residuals.weights_hash, d_model=X.shape[2],
                         probes=probes)
    return result.transfer_to(test_residuals, positive=positive)


def transfer_to(result_or_probe: ProbeResult | BaseEstimator, residuals: Residuals, positive: Any = None,
                layer: int | None = None) -> TransferResult:
    """Apply fitted probes to other residuals: :meth:`ProbeResult.transfer_to`, or one fitted
    estimator (e.g. a :class:`LinearSVMProbe`) applied at residual ``layer`` (required then;
    ``positive`` defaults to ``"harmful"`` if it is a class, else the estimator's last class).
    """
    if isinstance(result_or_probe, ProbeResult):
        return result_or_probe.transfer_to(residuals, positive=positive)
    est = result_or_probe
    if not hasattr(est, "classes_"):
        raise ProbeNotFittedError(f"This {type(est).__name__} is not fitted yet; fit it before transfer_to.")
    if layer is None:
        raise InputError("transfer_to with a single estimator needs layer=L (the residual layer it was fitted on).")
    X = _features(residuals)
    layer_id = _resolve_layers([layer], X.shape[1] - 1)[0]
    _check_finite(X, [layer_id])
    classes = _jsonable(np.asarray(est.classes_))
    if positive is None:
        positive = "harmful" if "harmful" in classes else classes[-1]
    if positive not in classes:
        raise InputError(f"positive={positive!r} is not a class of this estimator ({classes}).")
    shell = ProbeResult(layers=[layer_id], metrics={}, classes=classes, classifier=getattr(est, "kind", "")
                        or type(est).__name__, task="transfer", n=0, cv=0, seed=0, n_layers=X.shape[1] - 1,
                        chance=float("nan"), positive=positive, model_name=residuals.model_name,
                        d_model=X.shape[2])
    pred = np.asarray(est.predict(X[:, layer_id]))[:, None]
    return _transfer_result(pred, np.asarray(residuals.labels), shell, positive, residuals.prompts.name)


# -- cross-model comparison ---------------------------------------------------------------------

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
