"""The driver: :func:`probe_layers` fits one probe per residual layer with cross-validation, CIs and controls;
:class:`ProbeConfig` holds its options."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from ...capture import Residuals
from ...core import store
from ...core.errors import InputError
from ...core.stats import auroc_interval, wilson_interval
from ...core.validation import check_int, config_from_options
from .cv import _layer_job, _length_accuracy, _make_splits, _permutation_test, _run_layers
from .estimators import _make_estimator
from .features import (
    _check_finite,
    _check_labels,
    _diff_means,
    _feature_position,
    _features,
    _resolve_groups,
    _resolve_layers,
    request_groups,
)
from .results import _METRIC_COLUMNS, ProbeResult


@dataclass(frozen=True)
class ProbeConfig:
    """The options of :func:`probe_layers`; each is also a keyword of ``probe_layers`` itself.

    - ``classifier``: ``"svm"`` (the paper's), ``"logistic"``, ``"mlp"`` (100 hidden units),
      ``"diffmeans"`` (binary) or any sklearn classifier instance.
    - ``cv``: an int k, or any scikit-learn splitter that partitions the rows (``GroupKFold(5)``,
      ``StratifiedGroupKFold(...)``, ``KFold``...). With an int and groups that repeat,
      ``StratifiedGroupKFold`` is used; when every group is a single prompt (plain prompts),
      ``StratifiedKFold`` (the same folds as before groups existed). ``seed`` seeds the folds,
      the shuffled labels and the permutations.
    - ``groups``: ``"request"`` (the prompt's plain request, so a request and its jailbreak wrappers
      never sit in both train and test), ``None`` (no grouping) or one id per prompt. A splitter that
      puts one group on both sides raises :class:`InputError`.
    - ``layers``: residual layers to probe (default all, ``0..n_layers``).
    - ``controls``: one shuffled-label CV run per layer (doubles the cost) and a permutation test with
      ``n_permutations`` label permutations (splits kept fixed, p-value with the +1 correction,
      :func:`lens_safety.core.stats.permutation_pvalue`) at ``permutation_layers`` (``"best"``: only
      the most accurate layer, which is cheap — 20 permutations × k fits; ``"all"``; or a list of
      layers). The smallest p-value ``n_permutations`` can give is ``1 / (n + 1)``. The length-only
      baseline (a depth-2 tree on the token count) is always computed: it is free, and it matters most
      for the 3-way task, where jailbreak prompts are much longer.
    - ``n_jobs`` (threads over layers) and ``progress`` (a progress bar).
    - ``positive`` (binary): the class the directions point to (default ``"harmful"`` if present, else
      the second class). ``task``: the result's name (default ``"<class>-vs-<class>"``).
    - ``refit``: keep a probe per layer fitted on all data (for :meth:`ProbeResult.predict`,
      ``transfer_to``, ``save``).

    >>> ProbeConfig(classifier="logistic", cv=3).with_options(seed=1).seed
    1
    >>> ProbeConfig().with_options(folds=3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    TypeError: probe_layers() got unknown argument(s) 'folds'; valid options: classifier, cv, ...
    """

    classifier: str | BaseEstimator = "svm"
    cv: int | Any = 5
    seed: int = 0
    layers: Sequence[int] | None = None
    controls: bool = True
    n_jobs: int | None = None
    progress: bool = True
    positive: Any = None
    task: str | None = None
    refit: bool = True
    groups: str | Sequence[Any] | None = "request"
    n_permutations: int = 20
    permutation_layers: str | Sequence[int] = "best"

    def with_options(self, **options: Any) -> ProbeConfig:
        """A copy with ``options`` replaced; a :class:`TypeError` names unknown options and lists the valid ones."""
        return config_from_options(type(self), self, options, function="probe_layers")


def _positive_negative(positive: Any, classes: np.ndarray) -> tuple[Any, Any]:
    """The class the directions point to and, for a binary task, the other one (JSON-safe values)."""
    if positive is None:
        positive = ("harmful" if "harmful" in classes else classes[-1])
    elif positive not in classes:
        raise InputError(f"positive={positive!r} is not among the labels {classes.tolist()}.")
    positive = store.jsonable(positive)
    negative = store.jsonable(classes[0] if classes[0] != positive else classes[1]) if len(classes) == 2 else None
    return positive, negative


def _layer_metrics(outs: list[dict], y: np.ndarray, y_perm: np.ndarray | None,
                   classes: np.ndarray) -> dict[str, np.ndarray]:
    """The per-layer metric columns from the CV runs (accuracy, CIs, AUROC, shuffled-label control)."""
    n, binary = len(y), len(classes) == 2
    m = {k: np.full(len(outs), np.nan) for k in _METRIC_COLUMNS}
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
        if y_perm is not None:
            ks = int((o["shuffled"][0] == y_perm).sum())
            m["shuffled_accuracy"][i] = ks / n
            m["shuffled_ci_high"][i] = wilson_interval(ks, n)[1]
    return m


def probe_layers(residuals: Residuals, labels: Sequence[Any] | None = None, config: ProbeConfig | None = None,
                 **options: Any) -> ProbeResult:
    """Fit one probe per residual layer with (group-aware) stratified k-fold CV; accuracies, CIs, controls.

    Features are the residual at the captured position (``positions="last"``: the chat
    template's final token); for ``positions=k`` residuals the last of the k positions is used.
    Layers are ``0..n_layers`` (0 = embedding output, l = raw output of block l-1). ``labels``
    default to ``residuals.labels``: two classes for the 2-way task, three (harmless / harmful /
    jailbreak) for the 3-way one. The options (``classifier``, ``cv``, ``seed``, ``layers``,
    ``controls``, ``n_jobs``, ``progress``, ``positive``, ``task``, ``refit``, ``groups``,
    ``n_permutations``, ``permutation_layers``) are described in :class:`ProbeConfig`; pass them as
    keywords, as ``config=ProbeConfig(...)``, or both (keywords override the config).

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
    cfg = config_from_options(ProbeConfig, config, options, function="probe_layers")
    X = _features(residuals)
    n, n_res_layers, d = X.shape
    y, classes = _check_labels(labels if labels is not None else residuals.labels, n, None)
    g = _resolve_groups(cfg.groups, residuals, n)
    splits, n_splits, splitter_desc = _make_splits(cfg.cv, y, g, cfg.seed)
    layer_ids = _resolve_layers(cfg.layers, n_res_layers - 1)
    _check_finite(X, layer_ids)
    est, kind = _make_estimator(cfg.classifier)
    if kind == "diffmeans" and len(classes) != 2:
        raise InputError(f"classifier='diffmeans' is binary; got {len(classes)} classes {classes.tolist()}.")
    n_permutations = check_int(cfg.n_permutations, "n_permutations", low=0, hint="0 skips the permutation test")
    positive, negative = _positive_negative(cfg.positive, classes)
    binary = len(classes) == 2

    y_perm = splits_perm = None
    if cfg.controls:
        y_perm = np.random.default_rng(cfg.seed).permutation(y)
        splits_perm = _make_splits(cfg.cv, y_perm, g, cfg.seed)[0] if isinstance(cfg.cv, (int, np.integer)) \
            else splits
    jobs = [(est, X[:, layer], y, y_perm, splits, splits_perm, classes, cfg.refit) for layer in layer_ids]
    outs = _run_layers(_layer_job, jobs, cfg.n_jobs, cfg.progress, f"probe {kind}")
    m = _layer_metrics(outs, y, y_perm, classes)
    m["length_accuracy"][:] = _length_accuracy(residuals.n_tokens, y, splits, cfg.seed)
    if cfg.controls and n_permutations:
        _permutation_test(m, est, X, y, splits, classes, layer_ids, n_permutations, cfg.permutation_layers,
                          cfg.seed, cfg.n_jobs, cfg.progress)
    result = ProbeResult(
        layers=layer_ids, metrics=m, classes=store.jsonable(classes), classifier=kind,
        task=cfg.task or "-vs-".join(str(c) for c in classes), n=n, cv=n_splits, seed=cfg.seed,
        n_layers=n_res_layers - 1, chance=float(np.unique(y, return_counts=True)[1].max() / n),
        positive=positive if binary else None, model_name=residuals.model_name,
        weights_hash=residuals.weights_hash, d_model=d,
        params={"positions": residuals.positions, "controls": cfg.controls, "splitter": splitter_desc,
                "groups": cfg.groups if isinstance(cfg.groups, str) or cfg.groups is None else "custom",
                "n_groups": int(len(np.unique(g))) if g is not None else n,
                "n_permutations": int(n_permutations) if cfg.controls else 0,
                "estimator": store.jsonable(est.get_params()) if hasattr(est, "get_params") else {}},
        probes=[o["probe"] for o in outs] if cfg.refit else None, formatting=dict(residuals.formatting),
        positions=_feature_position(residuals.positions),
        request_keys=sorted(set(request_groups(residuals).tolist())) if cfg.refit else [])
    if binary and cfg.refit:
        dirs = _diff_means(X[:, layer_ids], y, positive, negative)
        m["direction_cosine"][:] = np.einsum("ld,ld->l", result.weight_directions(), dirs)
    return result
