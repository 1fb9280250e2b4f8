"""The probe estimators: scikit-learn classifiers whose fitted state is a few arrays (saved without pickle).

They follow scikit-learn conventions (constructor parameters only, ``fit`` returns ``self``, fitted state
ends in ``_``) and work inside ``Pipeline``, ``clone`` and ``cross_val_score``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError as _SkNotFittedError
from torch import Tensor

from ...core.errors import InputError
from ...core.errors import NotFittedError as _LsNotFittedError


class ProbeNotFittedError(_LsNotFittedError, _SkNotFittedError):
    """A probe was used before ``fit``: both lens_safety's and scikit-learn's NotFittedError."""


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
