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

The package: :mod:`.estimators` (the probes), :mod:`.features` (features, groups, difference-of-means
directions), :mod:`.cv` (splits, per-layer fits, permutation test), :mod:`.results` (:class:`ProbeResult`,
:class:`TransferResult`), :mod:`.layers` (:func:`probe_layers`, :class:`ProbeConfig`), :mod:`.transfer`
(:func:`probe_transfer`, :func:`transfer_to`) and :mod:`.claim1` (:func:`claim1_verdict`).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X, y = rng.normal(size=(40, 5)), np.array(["a", "b"] * 20)
>>> X[y == "b", 0] += 4
>>> float(DiffMeansProbe().fit(X, y).score(X, y)) > 0.9
True
"""

from __future__ import annotations

from ...core.stats import auroc_interval, wilson_interval
from .claim1 import CLAIM1_VERDICTS, Claim1Rule, Claim1Verdict, claim1_early, claim1_rule, claim1_verdict
from .estimators import DiffMeansProbe, LinearSVMProbe, LogisticProbe, MLPProbe, ProbeNotFittedError
from .features import _check_finite as _check_finite  # tests reach it here
from .features import refusal_directions, request_groups
from .layers import ProbeConfig, probe_layers
from .results import ARTIFACT_KIND as ARTIFACT_KIND
from .results import SCHEMA_VERSION as SCHEMA_VERSION
from .results import LayerAccuracy, ProbeResult, TransferResult, relative_depth_frame
from .transfer import probe_transfer, transfer_to

__all__ = [
    "ProbeNotFittedError", "LinearSVMProbe", "LogisticProbe", "MLPProbe", "DiffMeansProbe",
    "probe_layers", "ProbeConfig", "ProbeResult", "LayerAccuracy", "TransferResult", "probe_transfer", "transfer_to",
    "refusal_directions", "relative_depth_frame", "request_groups", "claim1_verdict", "Claim1Verdict",
    "claim1_rule", "claim1_early", "Claim1Rule",
    "CLAIM1_VERDICTS", "wilson_interval", "auroc_interval",
]
