"""Per-layer weak classifiers ("probes") on the residual stream, with CV, CIs and controls.

The paper's claim 1: a linear SVM (or a one-hidden-layer MLP of 100 units) trained on the
last-position residual of each layer separates harmful from harmless prompts within the
first few layers. :func:`probe_layers` fits one estimator per layer with stratified k-fold
cross-validation (grouped by plain request, so a request and its jailbreak wrappers never sit
in both train and test; any scikit-learn splitter works) and reports, per layer, the pooled
out-of-fold accuracy with a 95% Wilson interval, the fold-averaged AUROC with a Hanley–McNeil
interval (binary tasks), a shuffled-label control, a permutation test, a length-only control
and the cosine between the probe's weight vector and the difference-of-means direction.
:func:`claim1_verdict` turns a result into "reproduced" / "partly" / "not reproduced".

:func:`probe_transfer` applies harmful-vs-harmless probes to other prompts (jailbreaks) without
leaking: a test prompt that wraps a training request is scored by probes that never saw it.
Probes remember the formatting (chat template, system prompt) and position of the residuals they
were trained on, and refuse residuals made otherwise.

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

import hashlib
import math
import os
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

from ..capture import Residuals
from ..core import store
from ..core.errors import InputError, ModelMismatchError
from ..core.errors import NotFittedError as _LsNotFittedError
from ..core.stats import auroc_interval, permutation_pvalue, wilson_interval
from ..core.validation import check_finite, check_int, check_same_model

__all__ = [
    "ProbeNotFittedError", "LinearSVMProbe", "LogisticProbe", "MLPProbe", "DiffMeansProbe",
    "probe_layers", "ProbeResult", "LayerAccuracy", "TransferResult", "probe_transfer", "transfer_to",
    "refusal_directions", "relative_depth_frame", "request_groups", "claim1_verdict", "Claim1Verdict",
    "claim1_rule", "claim1_early", "Claim1Rule",
    "CLAIM1_VERDICTS", "wilson_interval", "auroc_interval",
]

SCHEMA_VERSION = 2
ARTIFACT_KIND = "probe_result"


class ProbeNotFittedError(_LsNotFittedError, _SkNotFittedError):
    """A probe was used before ``fit``: both lens_safety's and scikit-learn's NotFittedError."""


# -- statistics ---------------------------------------------------------------------------
# Intervals live in lens_safety.core.stats; ``probes.wilson_interval`` / ``probes.auroc_interval`` stay
# importable from here (re-exports).

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


def _feature_position(positions: str | int) -> str:
    """The position the probe features come from: ``"mean"``, or ``"last"`` (``positions="last"``
    and ``positions=k``, whose last entry is the same token)."""
    return "mean" if positions == "mean" else "last"


def _check_finite(X: np.ndarray, layers: Sequence[int]) -> None:
    check_finite({layer: X[:, layer] for layer in layers}, "The activations",
                 where=lambda bad: f"at layer(s) {[b[0] for b in bad]} (0 = embedding output)",
                 hint="Recapture them (e.g. in float32) or drop those layers with layers=[...].")


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


def _request_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def request_groups(residuals: Residuals) -> np.ndarray:
    """One group id per row: the plain request it asks (``Prompt.plain_request``).

    A jailbreak prompt and the plain request it wraps share a group, so do two wrappers of one
    request: CV that keeps groups apart never trains on a request it then tests.

    >>> from lens_safety.inputs.prompts import PromptSet
    >>> import lens_safety as ls, torch
    >>> ps = PromptSet.from_texts(["Do X", "Do Y"], label="harmful")
    >>> jb = ls.jailbreak(ps, "prefix_injection")
    >>> r = ls.Residuals(torch.zeros(4, 2, 3), ps + jb, torch.ones(4, dtype=torch.long), "m", "h", "last")
    >>> g = request_groups(r); bool(g[0] == g[2]), bool(g[0] == g[1])
    (True, False)
    """
    if not isinstance(residuals, Residuals):
        raise InputError(f"Expected a Residuals (from collect_residuals), got {type(residuals).__name__}.")
    return np.asarray([_request_key(p.plain_request) for p in residuals.prompts])


def _resolve_groups(groups: Any, residuals: Residuals, n: int) -> np.ndarray | None:
    if groups is None:
        return None
    if isinstance(groups, str):
        if groups != "request":
            raise InputError(f"groups must be 'request' (group by Prompt.plain_request), None (no grouping) or "
                             f"one group id per prompt; got {groups!r}.")
        return request_groups(residuals)
    g = np.asarray(list(groups))
    if g.shape[0] != n:
        raise InputError(f"Got {g.shape[0]} group ids for {n} activation rows; pass one group per prompt.")
    return g


def _make_splits(cv: Any, y: np.ndarray, groups: np.ndarray | None, seed: int) -> tuple[list, int, str]:
    """``(splits, n_splits, description)``. An int uses StratifiedKFold when every group is a single
    row and StratifiedGroupKFold when groups repeat; a splitter object is used as given."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    n = len(y)
    repeated = groups is not None and len(np.unique(groups)) < n
    if isinstance(cv, (bool, int, np.integer)):
        cv = check_int(cv, "cv", low=2, hint="the number of stratified folds; or a scikit-learn splitter")
        _check_labels(y, n, cv)
        if repeated:
            n_groups = len(np.unique(groups))
            if n_groups < cv:
                raise InputError(f"cv={cv} folds need at least {cv} groups, got {n_groups}; lower cv or pass "
                                 "groups=None.")
            splitter = StratifiedGroupKFold(n_splits=cv, shuffle=True, random_state=seed)
        else:
            splitter = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    elif hasattr(cv, "split") and hasattr(cv, "get_n_splits"):
        splitter = cv
    else:
        raise InputError(f"cv must be an int ≥ 2 or a scikit-learn splitter (e.g. GroupKFold(5)), "
                         f"got {type(cv).__name__}.")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The groups parameter is ignored")  # checked below
            splits = [(np.asarray(tr), np.asarray(te)) for tr, te in splitter.split(np.zeros((n, 1)), y, groups)]
    except ValueError as e:
        raise InputError(f"The splitter {splitter!r} failed on these labels/groups: {e}") from e
    counts = np.zeros(n, dtype=int)
    for tr, te in splits:
        counts[te] += 1
        if groups is not None and np.intersect1d(groups[tr], groups[te]).size:
            raise InputError(f"{splitter!r} puts prompts of one group (the same plain request, e.g. a request "
                             "and its jailbreak wrappers) in both train and test; use GroupKFold / "
                             "StratifiedGroupKFold, or pass groups=None to allow it.")
        if len(np.unique(y[tr])) < 2:
            raise InputError(f"A training fold of {splitter!r} holds a single class; use a stratified splitter.")
    if not (counts == 1).all():
        raise InputError(f"{splitter!r} does not put every prompt in exactly one test fold (pooled out-of-fold "
                         "accuracy needs a partition); use a K-fold splitter, not ShuffleSplit.")
    return splits, len(splits), repr(splitter)


# -- the per-layer work ---------------------------------------------------------------------

def _cv_layer(est, X: np.ndarray, y: np.ndarray, splits, classes: np.ndarray):
    """Out-of-fold predictions and (binary) scores, plus per-fold accuracies and AUROCs."""
    from sklearn.metrics import roc_auc_score

    pred = np.empty(len(y), dtype=y.dtype)
    score = np.full(len(y), np.nan)
    fold_acc, fold_auc = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for train, test in splits:
            m = clone(est).fit(X[train], y[train])
            pred[test] = m.predict(X[test])
            if len(classes) == 2 and hasattr(m, "decision_function"):
                score[test] = m.decision_function(X[test])
                pos = y[test] == classes[1]
                ok = 0 < pos.sum() < len(pos) and np.isfinite(score[test]).all()
                fold_auc.append(float(roc_auc_score(pos, score[test])) if ok else np.nan)
            fold_acc.append(float(np.mean(pred[test] == y[test])))
    return pred, score, np.array(fold_acc), np.array(fold_auc, dtype=np.float64)


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


def _permutation_job(est, X_l: np.ndarray, y_perm: np.ndarray, splits, classes: np.ndarray) -> float:
    pred = _cv_layer(est, np.ascontiguousarray(X_l, dtype=np.float64), y_perm, splits, classes)[0]
    return float(np.mean(pred == y_perm))


def _run_layers(fn, args_per_layer: list[tuple], n_jobs: int | None, progress: bool, desc: str) -> list:
    if n_jobs in (None, 1):
        it = (fn(*a) for a in args_per_layer)
    else:
        from joblib import Parallel, delayed

        it = Parallel(n_jobs=n_jobs, return_as="generator", prefer="threads")(delayed(fn)(*a) for a in args_per_layer)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(args_per_layer), desc=desc, unit="fit" if "permutation" in desc else "layer")
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
    >>> from lens_safety.inputs.prompts import PromptSet
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
        from .figures import probe_figure

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
        from ..core.errors import CacheError

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


_jsonable = store.jsonable


def _default_label(r: ProbeResult) -> str:
    return f"{r.model_name or 'model'} · {r.classifier}"


# -- the driver ---------------------------------------------------------------------------

def probe_layers(residuals: Residuals, labels: Sequence[Any] | None = None, classifier: str | BaseEstimator = "svm",
                 cv: int | Any = 5, seed: int = 0, layers: Sequence[int] | None = None, controls: bool = True,
                 n_jobs: int | None = None, progress: bool = True, *, positive: Any = None, task: str | None = None,
                 refit: bool = True, groups: str | Sequence[Any] | None = "request", n_permutations: int = 20,
                 permutation_layers: str | Sequence[int] = "best") -> ProbeResult:
    """Fit one probe per residual layer with (group-aware) stratified k-fold CV; accuracies, CIs, controls.

    Features are the residual at the captured position (``positions="last"``: the chat
    template's final token); for ``positions=k`` residuals the last of the k positions is used.
    Layers are ``0..n_layers`` (0 = embedding output, l = raw output of block l-1).
    ``classifier``: ``"svm"`` (the paper's), ``"logistic"``, ``"mlp"`` (100 hidden units),
    ``"diffmeans"`` (binary) or any sklearn classifier instance. ``labels`` default to
    ``residuals.labels``: two classes for the 2-way task, three (harmless / harmful /
    jailbreak) for the 3-way one. ``positive`` (binary) is the class the directions point to
    (default ``"harmful"`` if present, else the second class).

    ``cv``: an int k, or any scikit-learn splitter that partitions the rows (``GroupKFold(5)``,
    ``StratifiedGroupKFold(...)``, ``KFold``...). ``groups``: ``"request"`` (default: the prompt's
    plain request, so a request and its jailbreak wrappers never sit in both train and test),
    ``None`` (no grouping) or one id per prompt. With an int ``cv`` and groups that repeat,
    ``StratifiedGroupKFold`` is used; when every group is a single prompt (plain prompts),
    ``StratifiedKFold`` (the same folds as before groups existed). A splitter that puts one group on
    both sides raises :class:`InputError`.

    Controls: the length-only baseline (a depth-2 tree on the token count, always computed: it is
    free, and it matters most for the 3-way task, where jailbreak prompts are much longer);
    with ``controls=True`` also one shuffled-label CV run per layer (doubles the cost) and a
    permutation test with ``n_permutations`` label permutations (splits kept fixed, p-value with
    the +1 correction, :func:`lens_safety.core.stats.permutation_pvalue`) at ``permutation_layers``
    (``"best"``: only the most accurate layer, which is cheap — 20 permutations × k fits; ``"all"``;
    or a list of layers). The smallest p-value ``n_permutations`` can give is ``1 / (n + 1)``.
    ``refit`` keeps a probe per layer fitted on all data (for :meth:`ProbeResult.predict`,
    ``transfer_to``, ``save``).

    >>> import lens_safety as ls, torch
    >>> from lens_safety.inputs.prompts import PromptSet
    >>> ps = PromptSet.from_texts([f"h{i}" for i in range(10)], label="harmful") + \\
    ...      PromptSet.from_texts([f"s{i}" for i in range(10)], label="harmless")
    >>> v = torch.randn(20, 3, 8, generator=torch.Generator().manual_seed(0)); v[:10, 2, 0] += 5
    >>> r = ls.Residuals(v, ps, torch.full((20,), 7), "m", "h", "last")
    >>> res = ls.probe_layers(r, cv=5, progress=False)
    >>> res.to_frame().accuracy.round(2).tolist()[2]
    1.0
    >>> float(res.to_frame().permutation_pvalue[2]) < 0.1
    True
    """
    X = _features(residuals)
    n, n_res_layers, d = X.shape
    n_layers = n_res_layers - 1
    y, classes = _check_labels(labels if labels is not None else residuals.labels, n, None)
    g = _resolve_groups(groups, residuals, n)
    splits, n_splits, splitter_desc = _make_splits(cv, y, g, seed)
    layer_ids = _resolve_layers(layers, n_layers)
    _check_finite(X, layer_ids)
    est, kind = _make_estimator(classifier)
    if kind == "diffmeans" and len(classes) != 2:
        raise InputError(f"classifier='diffmeans' is binary; got {len(classes)} classes {classes.tolist()}.")
    n_permutations = check_int(n_permutations, "n_permutations", low=0, hint="0 skips the permutation test")
    binary = len(classes) == 2
    if positive is None:
        positive = ("harmful" if "harmful" in classes else classes[-1])
    elif positive not in classes:
        raise InputError(f"positive={positive!r} is not among the labels {classes.tolist()}.")
    positive = _jsonable(positive)
    negative = _jsonable(classes[0] if classes[0] != positive else classes[1]) if binary else None

    y_perm = splits_perm = None
    if controls:
        y_perm = np.random.default_rng(seed).permutation(y)
        splits_perm = _make_splits(cv, y_perm, g, seed)[0] if isinstance(cv, (int, np.integer)) else splits
    jobs = [(est, X[:, layer], y, y_perm, splits, splits_perm, classes, refit) for layer in layer_ids]
    outs = _run_layers(_layer_job, jobs, n_jobs, progress, f"probe {kind}")

    L = len(layer_ids)
    m = {k: np.full(L, np.nan) for k in _METRIC_COLUMNS}
    pos_mask = y == classes[1]
    for i, o in enumerate(outs):
        pred, score, fold_acc, fold_auc = o["cv"]
        k = int((pred == y).sum())
        m["accuracy"][i] = k / n
        m["ci_low"][i], m["ci_high"][i] = wilson_interval(k, n)
        m["fold_std"][i] = float(fold_acc.std(ddof=1)) if len(fold_acc) > 1 else 0.0
        if binary and fold_auc.size and np.isfinite(fold_auc).all():
            m["auroc"][i] = float(fold_auc.mean())
            m["auroc_fold_std"][i] = float(fold_auc.std(ddof=1)) if fold_auc.size > 1 else 0.0
            m["auroc_low"][i], m["auroc_high"][i] = auroc_interval(m["auroc"][i], int(pos_mask.sum()),
                                                                   int((~pos_mask).sum()))
        if controls:
            ks = int((o["shuffled"][0] == y_perm).sum())
            m["shuffled_accuracy"][i] = ks / n
            m["shuffled_ci_high"][i] = wilson_interval(ks, n)[1]
    m["length_accuracy"][:] = _length_accuracy(residuals.n_tokens, y, splits, seed)
    if controls and n_permutations:
        _permutation_test(m, est, X, y, splits, classes, layer_ids, n_permutations, permutation_layers, seed,
                          n_jobs, progress)
    probes = [o["probe"] for o in outs] if refit else None
    counts = np.unique(y, return_counts=True)[1]
    result = ProbeResult(
        layers=layer_ids, metrics=m, classes=_jsonable(classes), classifier=kind,
        task=task or "-vs-".join(str(c) for c in classes), n=n, cv=n_splits, seed=seed, n_layers=n_layers,
        chance=float(counts.max() / n), positive=positive if binary else None,
        model_name=residuals.model_name, weights_hash=residuals.weights_hash, d_model=d,
        params={"positions": residuals.positions, "controls": controls, "splitter": splitter_desc,
                "groups": groups if isinstance(groups, str) or groups is None else "custom",
                "n_groups": int(len(np.unique(g))) if g is not None else n,
                "n_permutations": int(n_permutations) if controls else 0,
                "estimator": _jsonable(est.get_params()) if hasattr(est, "get_params") else {}},
        probes=probes, formatting=dict(residuals.formatting), positions=_feature_position(residuals.positions),
        request_keys=sorted(set(request_groups(residuals).tolist())) if refit else [])
    if binary and refit:
        dirs = _diff_means(X[:, layer_ids], y, positive, negative)
        m["direction_cosine"][:] = np.einsum("ld,ld->l", result.weight_directions(), dirs)
    return result


def _permutation_test(m: dict[str, np.ndarray], est, X: np.ndarray, y: np.ndarray, splits, classes: np.ndarray,
                      layer_ids: list[int], n_permutations: int, which: str | Sequence[int], seed: int,
                      n_jobs: int | None, progress: bool) -> None:
    """Fill ``permutation_pvalue`` / ``permutation_null_high`` at the chosen layers (in place)."""
    if isinstance(which, str):
        if which == "best":
            rows = [int(np.nanargmax(m["accuracy"]))]
        elif which == "all":
            rows = list(range(len(layer_ids)))
        else:
            raise InputError(f"permutation_layers must be 'best', 'all' or a list of layers, got {which!r}.")
    else:
        rows = []
        for layer in which:
            if int(layer) not in layer_ids:
                raise InputError(f"permutation_layers: layer {layer} is not among the probed layers {layer_ids}.")
            rows.append(layer_ids.index(int(layer)))
    rng = np.random.default_rng(seed + 1)
    perms = [rng.permutation(y) for _ in range(n_permutations)]
    jobs = [(est, X[:, layer_ids[r]], yp, splits, classes) for r in rows for yp in perms]
    null = np.asarray(_run_layers(_permutation_job, jobs, n_jobs, progress, "permutation test"))
    null = null.reshape(len(rows), n_permutations)
    for r, nl in zip(rows, null):
        m["permutation_pvalue"][r] = permutation_pvalue(m["accuracy"][r], nl)
        m["permutation_null_high"][r] = float(np.quantile(nl, 0.95))


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

_HOLDOUTS = ("crossfit", "exclude", "none")


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
        from .figures import transfer_figure

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
        from ..core.errors import CacheError

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


def _fit_layers(est, X: np.ndarray, y: np.ndarray, layer_ids: list[int], n_jobs: int | None, progress: bool,
                desc: str) -> list:
    return _run_layers(_fit_full, [(est, np.ascontiguousarray(X[:, layer], np.float64), y) for layer in layer_ids],
                       n_jobs, progress, desc)


def probe_transfer(train_residuals: Residuals, test_residuals: Residuals, positive: str = "harmful",
                   negative: str | None = "harmless", classifier: str | BaseEstimator = "svm",
                   layers: Sequence[int] | None = None, n_jobs: int | None = None,
                   progress: bool = False, *, holdout: str | None = "crossfit", n_splits: int = 5,
                   seed: int = 0) -> TransferResult:
    """Train per layer on ``positive`` vs ``negative`` prompts of ``train_residuals``, then classify
    ``test_residuals`` (e.g. jailbreaks, or another dataset) — leak-free by request.

    Reports per layer the fraction of test prompts classified ``positive`` with a 95% Wilson CI
    (the paper's "jailbreaks cannot fool the early layers"), and the accuracy when the test
    labels are ``positive``/``negative`` (cross-dataset transfer). ``negative=None`` uses every
    other label as the negative class.

    Test prompts that ask a request also present in the training set (matched on
    ``Prompt.plain_request``: a jailbreak of a training request) would be scored by a probe that
    has seen that very request. ``holdout`` decides what happens to them:

    - ``"crossfit"`` (default): the shared requests are split into ``n_splits`` groups; each
      group's test prompts are scored by probes trained on everything but that group's requests.
      Test prompts of unseen requests are scored by probes trained on all training prompts.
    - ``"exclude"``: every shared request is dropped from training; one fit.
    - ``None`` / ``"none"``: train on everything (the leaky number, for comparison).

    >>> import lens_safety as ls, torch
    >>> from lens_safety.inputs.prompts import PromptSet
    >>> hb = PromptSet.from_texts([f"bad {i}" for i in range(20)], label="harmful")
    >>> ok = PromptSet.from_texts([f"good {i}" for i in range(20)], label="harmless")
    >>> v = torch.randn(40, 2, 8, generator=torch.Generator().manual_seed(0)); v[:20, 1, 0] += 6
    >>> train = ls.Residuals(v, hb + ok, torch.full((40,), 9), "m", "h", "last")
    >>> jb = ls.jailbreak(hb[:10], "prefix_injection")
    >>> test = ls.Residuals(v[:10], jb, torch.full((10,), 30), "m", "h", "last")
    >>> t = probe_transfer(train, test)
    >>> t.holdout, t.n_seen, float(t.positive_rate[1])
    ('crossfit', 10, 1.0)
    """
    holdout = "none" if holdout is None else holdout
    if holdout not in _HOLDOUTS:
        raise InputError(f"holdout must be one of {_HOLDOUTS} (or None), got {holdout!r}.")
    n_splits = check_int(n_splits, "n_splits", low=2)
    X = _features(train_residuals)
    y = np.asarray(train_residuals.labels)
    if not (y == positive).any():
        raise InputError(f"No training prompt has label {positive!r}; labels: {sorted(set(y.tolist()))}.")
    keep = (y == positive) | (y == negative) if negative is not None else np.ones(len(y), bool)
    if negative is not None and not (y == negative).any():
        raise InputError(f"No training prompt has label {negative!r}; labels: {sorted(set(y.tolist()))}.")
    y = np.where(y[keep] == positive, positive, negative if negative is not None else "other")
    X = X[keep]
    g_train = request_groups(train_residuals)[keep]
    _check_labels(y, len(y), None)
    layer_ids = _resolve_layers(layers, X.shape[1] - 1)
    _check_finite(X, layer_ids)
    est, kind = _make_estimator(classifier)
    classes = _jsonable(np.unique(y))
    shell = ProbeResult(layers=layer_ids, metrics={}, classes=classes, classifier=kind, task="transfer",
                        n=len(y), cv=0, seed=seed, n_layers=X.shape[1] - 1, chance=float("nan"), positive=positive,
                        model_name=train_residuals.model_name, weights_hash=train_residuals.weights_hash,
                        d_model=X.shape[2], formatting=dict(train_residuals.formatting),
                        positions=_feature_position(train_residuals.positions))
    X_test = shell._test_features(test_residuals)  # same model, formatting, position, finite
    g_test = request_groups(test_residuals)
    seen = np.isin(g_test, g_train)

    def fit(rows: np.ndarray, desc: str) -> list:
        if len(np.unique(y[rows])) < 2:
            raise InputError("Holding the test requests out of training leaves a single class; add training "
                             "prompts of the other class or use holdout='crossfit'.")
        return _fit_layers(est, X[rows], y[rows], layer_ids, n_jobs, progress, desc)

    def predict(probes: list, rows: np.ndarray) -> np.ndarray:
        return np.stack([p.predict(X_test[rows][:, layer]) for p, layer in zip(probes, layer_ids)], axis=1)

    all_rows = np.arange(len(y))
    pred = np.empty((len(g_test), len(layer_ids)), dtype=object)
    if holdout == "none" or not seen.any():
        pred[:] = predict(fit(all_rows, f"fit {kind}"), np.arange(len(g_test)))
    elif holdout == "exclude":
        train_rows = all_rows[~np.isin(g_train, g_test[seen])]
        pred[:] = predict(fit(train_rows, f"fit {kind} (test requests held out)"), np.arange(len(g_test)))
    else:
        shared = np.unique(g_test[seen])
        shared = shared[np.random.default_rng(seed).permutation(len(shared))]
        for c, chunk in enumerate(np.array_split(shared, min(n_splits, len(shared)))):
            test_rows = np.flatnonzero(np.isin(g_test, chunk))
            train_rows = all_rows[~np.isin(g_train, chunk)]
            pred[test_rows] = predict(fit(train_rows, f"cross-fit {kind} {c + 1}"), test_rows)
        if (~seen).any():
            rows = np.flatnonzero(~seen)
            pred[rows] = predict(fit(all_rows, f"fit {kind}"), rows)
    out = _transfer_result(pred, np.asarray(test_residuals.labels), shell, positive, test_residuals.prompts.name)
    out.holdout, out.n_seen = holdout, int(seen.sum())
    return out


def transfer_to(result_or_probe: ProbeResult | BaseEstimator, residuals: Residuals, positive: Any = None,
                layer: int | None = None, *, allow_seen: bool = False) -> TransferResult:
    """Apply fitted probes to other residuals: :meth:`ProbeResult.transfer_to` (which refuses test
    prompts of training requests unless ``allow_seen=True``), or one fitted estimator (e.g. a
    :class:`LinearSVMProbe`) applied at residual ``layer`` (required then; ``positive`` defaults to
    ``"harmful"`` if it is a class, else the estimator's last class; a bare estimator records no
    training requests, so nothing is checked: prefer :func:`probe_transfer`).
    """
    if isinstance(result_or_probe, ProbeResult):
        return result_or_probe.transfer_to(residuals, positive=positive, allow_seen=allow_seen)
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


# -- claim 1's verdict ---------------------------------------------------------------------------

CLAIM1_VERDICTS = ("reproduced", "partly", "not reproduced")


@dataclass
class Claim1Verdict:
    """Claim 1 ("harmful vs harmless is linearly separable, ≥ ``threshold``, within the first few
    layers") judged on one :class:`ProbeResult`. See :func:`claim1_verdict` for the rules.

    ``first`` is the first layer with accuracy ≥ threshold (None if none), ``early_best`` the most
    accurate of layers ``1..early``, ``best`` the most accurate layer overall (each with its 95%
    Wilson CI). ``length_accuracy`` and ``shuffled_max`` are the result's controls.
    """

    verdict: str
    threshold: float
    early: int
    first: LayerAccuracy | None
    early_best: LayerAccuracy | None
    best: LayerAccuracy
    n: int
    n_layers: int
    name: str
    length_accuracy: float
    shuffled_max: float
    embedding_at_chance: bool | None
    reason: str
    result: ProbeResult | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.name}: {self.verdict} — {self.reason}"

    def to_frame(self):
        """One row: name, verdict, threshold, early, first/early-best/best layer with CIs, controls, reason."""
        import pandas as pd

        row: dict[str, Any] = {"name": self.name, "verdict": self.verdict, "threshold": self.threshold,
                               "early": self.early, "n": self.n, "n_layers": self.n_layers}
        for key, la in (("first", self.first), ("early_best", self.early_best), ("best", self.best)):
            row[f"{key}_layer"] = None if la is None else la.layer
            row[f"{key}_accuracy"] = np.nan if la is None else la.accuracy
            row[f"{key}_ci_low"] = np.nan if la is None else la.ci_low
            row[f"{key}_ci_high"] = np.nan if la is None else la.ci_high
        row.update(length_accuracy=self.length_accuracy, shuffled_max=self.shuffled_max,
                   embedding_at_chance=self.embedding_at_chance, reason=self.reason)
        return pd.DataFrame([row])

    def plot(self, ax=None, others: Sequence[Claim1Verdict] = ()):
        """Accuracy curve(s) with CI bands, the threshold and the early-layer band. Returns the Figure
        (drawn by :func:`lens_safety.analyses.figures.claim1_figure`)."""
        from .figures import claim1_figure

        return claim1_figure([self, *others], ax=ax)

    _LAYERS = ("first", "early_best", "best")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the verdict as a :mod:`lens_safety.core.store` artifact (JSON), its :class:`ProbeResult` (when
        it has one) in the sub-folder ``result``."""
        meta = {k: getattr(self, k) for k in ("verdict", "threshold", "early", "n", "n_layers", "name",
                                              "length_accuracy", "shuffled_max", "embedding_at_chance", "reason")}
        meta.update({k: None if getattr(self, k) is None else list(getattr(self, k)) for k in self._LAYERS})
        return store.write_artifact(directory, kind="Claim1Verdict", schema_version=SCHEMA_VERSION, meta=meta,
                                    children=None if self.result is None else {"result": self.result})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Claim1Verdict:
        """Load what :meth:`save` wrote (and its ProbeResult); :class:`~lens_safety.core.errors.CacheError` if it
        or its ``result`` sub-folder is missing or damaged."""
        from ..core.errors import CacheError

        _, meta = store.read_artifact(directory, kind="Claim1Verdict", schema_version=SCHEMA_VERSION,
                                      framework="numpy")
        try:
            f = store.json_float
            layers = {k: None if meta[k] is None else LayerAccuracy(int(meta[k][0]), *(f(x) for x in meta[k][1:]))
                      for k in cls._LAYERS}
            chance = meta["embedding_at_chance"]
            result = ProbeResult.load(Path(directory) / "result") if "result" in meta.get("children_sha256", {}) \
                else None
            return cls(str(meta["verdict"]), float(meta["threshold"]), int(meta["early"]), layers["first"],
                       layers["early_best"], layers["best"], int(meta["n"]), int(meta["n_layers"]), str(meta["name"]),
                       f(meta["length_accuracy"]), f(meta["shuffled_max"]), None if chance is None else bool(chance),
                       str(meta["reason"]), result)
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{directory}: saved Claim1Verdict is malformed ({e}); delete it and recompute.") from e


def _fmt(la: LayerAccuracy) -> str:
    return f"layer {la.layer} ({la.accuracy:.3f}, 95% CI {la.ci_low:.3f}–{la.ci_high:.3f})"


def claim1_early(n_layers: int, early_fraction: float = 0.25) -> int:
    """The last layer that counts as "the first few": ``max(2, ceil(early_fraction x n_layers))``
    (6 of 24 blocks).

    >>> claim1_early(24), claim1_early(8), claim1_early(4)
    (6, 2, 2)
    """
    return max(2, math.ceil(early_fraction * n_layers))


class Claim1Rule(NamedTuple):
    """What :func:`claim1_rule` finds on a per-layer accuracy curve (layers ≥ 1 only; NaN never counts)."""

    status: str  #: "reproduced", "partly" or "not reproduced"
    first: LayerAccuracy | None  #: the first layer whose accuracy is ≥ threshold
    early_best: LayerAccuracy | None  #: the most accurate of layers 1..early
    body_best: LayerAccuracy | None  #: the most accurate layer
    covering: LayerAccuracy | None  #: the most accurate layer whose CI reaches the threshold


def claim1_rule(layers: Sequence[int], accuracy, ci_low, ci_high, *, early: int,
                threshold: float = 0.95) -> Claim1Rule:
    """The claim-1 rule, on pooled out-of-fold accuracy per layer (layer 0, the embedding, never counts):
    **reproduced** when the first layer with accuracy ≥ ``threshold`` is within ``1..early``;
    **partly** when it comes later, or no layer reaches it but some layer's 95% CI does; else
    **not reproduced**. The one source of the rule for :func:`claim1_verdict` and
    :func:`lens_safety.pipeline.report.verdict_claim1` (ties: the first layer).

    >>> r = claim1_rule([0, 1, 2, 3], [0.5, 0.9, 0.94, 0.96], [0.4, 0.85, 0.9, 0.93], [0.6, 0.95, 0.97, 0.98],
    ...                 early=2)
    >>> r.status, r.first.layer, r.early_best.layer
    ('partly', 3, 2)
    """
    acc, lo, hi = (np.asarray(a, dtype=np.float64) for a in (accuracy, ci_low, ci_high))
    at = [LayerAccuracy(int(layer), float(acc[i]), float(lo[i]), float(hi[i])) for i, layer in enumerate(layers)]
    body = [la for la in at if la.layer >= 1]

    def best(rows: list[LayerAccuracy]) -> LayerAccuracy | None:
        rows = [la for la in rows if la.accuracy == la.accuracy]
        return max(rows, key=lambda la: la.accuracy) if rows else None  # max keeps the first on ties

    first = next((la for la in body if la.accuracy >= threshold), None)
    covering = best([la for la in body if la.ci_high >= threshold])
    if first is not None and first.layer <= early:
        status = "reproduced"
    elif first is not None or covering is not None:
        status = "partly"
    else:
        status = "not reproduced"
    return Claim1Rule(status, first, best([la for la in body if la.layer <= early]), best(body), covering)


def claim1_verdict(result: ProbeResult, threshold: float = 0.95, early: int | None = None,
                   name: str | None = None) -> Claim1Verdict:
    """Judge claim 1 on a 2-way :class:`ProbeResult`: ``"reproduced"``, ``"partly"`` or ``"not reproduced"``.

    ``early`` is the last layer that counts as "the first few layers" (default
    ``max(2, ceil(n_layers / 4))``: 6 of 24 blocks, as the report's verdict; the paper's
    Llama-2-7b-chat reached 0.95 at layer 2 of 32). Layer 0 (the embedding output) never counts.
    The rules, on pooled out-of-fold accuracy:

    - **reproduced**: some layer in ``1..early`` has accuracy ≥ ``threshold``;
    - **partly**: not that, but a later layer reaches ``threshold``, or no layer does but some
      layer's 95% CI includes it;
    - **not reproduced**: no layer reaches ``threshold`` and no layer's CI includes it.

    The reason names the layers with their CIs and adds the length-only and shuffled-label
    controls; a length-only control near the threshold means the sets differ in length.

    >>> import numpy as np
    >>> acc = np.array([0.5, 0.8, 0.96, 0.99, 0.99])
    >>> r = ProbeResult(layers=list(range(5)), metrics={"accuracy": acc, "ci_low": acc - 0.03,
    ...                 "ci_high": np.minimum(acc + 0.02, 1)}, classes=["harmful", "harmless"],
    ...                 classifier="svm", task="2-way", n=400, cv=5, seed=0, n_layers=4, chance=0.5)
    >>> v = claim1_verdict(r, early=2)
    >>> v.verdict, v.first.layer
    ('reproduced', 2)
    >>> claim1_verdict(r, early=1).verdict
    'partly'
    """
    if not isinstance(result, ProbeResult):
        raise InputError(f"claim1_verdict takes a ProbeResult (from probe_layers), got {type(result).__name__}.")
    if not 0 < float(threshold) <= 1:
        raise InputError(f"threshold must be in (0, 1], got {threshold!r}.")
    if early is None:
        early = claim1_early(result.n_layers)
    early = check_int(early, "early", low=1, high=result.n_layers, kind="a layer", hint="the last 'early' layer")
    m = result.metrics
    rule = claim1_rule(result.layers, m["accuracy"], m["ci_low"], m["ci_high"], early=early, threshold=threshold)
    verdict, first, early_best = rule.status, rule.first, rule.early_best
    best = result.best_layer()
    if verdict == "reproduced":
        reason = f"accuracy ≥ {threshold} first at {_fmt(first)}, within layers 1–{early}"
    elif verdict == "partly":
        if first is not None:
            reason = f"accuracy ≥ {threshold} only from {_fmt(first)}, after layer {early}"
        else:
            reason = f"no layer reaches {threshold}, but the CI of {_fmt(rule.covering)} includes it"
        if early_best is not None:
            reason += f"; best early layer: {_fmt(early_best)}"
    else:
        reason = f"no layer reaches {threshold}; best {_fmt(best)}"
        if early_best is not None:
            reason += f"; best early layer: {_fmt(early_best)}"
    length = float(np.nanmax(m["length_accuracy"])) if np.isfinite(m.get("length_accuracy", [np.nan])).any() \
        else float("nan")
    shuffled = float(np.nanmax(m["shuffled_accuracy"])) if np.isfinite(m.get("shuffled_accuracy", [np.nan])).any() \
        else float("nan")
    notes = []
    if math.isfinite(length):
        notes.append(f"length-only control {length:.3f}")
    if math.isfinite(shuffled):
        notes.append(f"shuffled labels ≤ {shuffled:.3f}")
    if notes:
        reason += " (" + ", ".join(notes) + f"; chance {result.chance:.3f})"
    return Claim1Verdict(verdict, float(threshold), early, first, early_best, best, result.n, result.n_layers,
                         name or result.task, length, shuffled, result.embedding_at_chance, reason, result)


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
