"""Cross-validation machinery: splits, per-layer fits (serial or threaded), the permutation test and the
length-only control."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor

from ...core.errors import InputError
from ...core.stats import permutation_pvalue
from ...core.validation import check_int
from .features import _check_labels


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
