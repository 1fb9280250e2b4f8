"""Probes applied to other prompts (e.g. jailbreaks) without leaking a training request into the test."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from ...capture import Residuals
from ...core import store
from ...core.errors import InputError
from ...core.validation import check_int
from .cv import _fit_full, _run_layers
from .estimators import ProbeNotFittedError, _make_estimator
from .features import _check_finite, _check_labels, _feature_position, _features, _resolve_layers, request_groups
from .results import ProbeResult, TransferResult, _transfer_result

_HOLDOUTS = ("crossfit", "exclude", "none")


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
    classes = store.jsonable(np.unique(y))
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
    classes = store.jsonable(np.asarray(est.classes_))
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
