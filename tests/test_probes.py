"""Probes: planted directions are recovered, controls sit at chance, CIs behave, artifacts round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold, cross_val_predict, cross_val_score
from sklearn.pipeline import make_pipeline

import lens_safety as ls
from lens_safety.errors import InputError, ModelMismatchError, NotFittedError
from lens_safety.probes import (
    DiffMeansProbe,
    LinearSVMProbe,
    LogisticProbe,
    MLPProbe,
    ProbeResult,
    auroc_interval,
    probe_transfer,
    refusal_directions,
    relative_depth_frame,
    wilson_interval,
)
from lens_safety.prompts import PromptSet

ESTIMATORS = [LinearSVMProbe, LogisticProbe, MLPProbe, DiffMeansProbe]


def planted(n_per=100, n_layers=4, d=16, layers=(2, 3), strength=8.0, seed=0, classes=("harmful", "harmless"),
            weights_hash="hash"):
    """Gaussian residuals; the first class is shifted by ``strength * u`` at ``layers``; layer 0 is
    identical for every row (the chat template's last token)."""
    k = len(classes)
    u = np.random.default_rng(1234).normal(size=(k, d))  # the planted directions do not depend on seed
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(k * n_per, n_layers + 1, d)).astype(np.float32)
    v[:, 0] = v[0, 0]
    for c in range(k - 1):  # every class but the last gets its own planted shift
        for layer in layers:
            v[c * n_per:(c + 1) * n_per, layer] += strength * u[c]
    ps = PromptSet([p for c in classes for p in PromptSet.from_texts([f"{c} {i}" for i in range(n_per)], label=c)])
    n_tok = torch.from_numpy(rng.integers(10, 40, k * n_per))
    return ls.Residuals(torch.from_numpy(v), ps, n_tok, "synth", weights_hash, "last"), u


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.fixture(scope="module")
def svm_result(data):
    return ls.probe_layers(data[0], classifier="svm", cv=5, progress=False)


# -- planted direction ------------------------------------------------------------------

def test_planted_layers_recovered_and_controls_at_chance(svm_result):
    acc = svm_result.metrics["accuracy"]
    assert acc[2] >= 0.99 and acc[3] >= 0.99
    assert acc[0] == 0.5 and abs(acc[1] - 0.5) < 0.1 and abs(acc[4] - 0.5) < 0.1
    assert np.all(np.abs(svm_result.metrics["shuffled_accuracy"] - 0.5) < 0.1)
    assert abs(svm_result.metrics["length_accuracy"][0] - 0.5) < 0.1  # length independent of label
    assert svm_result.embedding_at_chance is True
    assert svm_result.metrics["auroc"][2] > 0.999 and abs(svm_result.metrics["auroc"][4] - 0.5) < 0.1
    first = svm_result.first_layer_above(0.95)
    assert first.layer == 2 and first.accuracy >= 0.99 and first.ci_low < first.accuracy <= first.ci_high
    assert svm_result.first_layer_above(1.01) is None
    df = svm_result.to_frame()
    assert list(df.layer) == [0, 1, 2, 3, 4] and set(df.n) == {200} and set(df.task) == {"harmful-vs-harmless"}
    assert df.relative_depth.tolist() == [0, 0.25, 0.5, 0.75, 1.0]


def test_accuracy_equals_sklearn_cross_val_predict(data, svm_result):
    res, _ = data
    y = np.asarray(res.labels)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    for layer in (1, 2):
        pred = cross_val_predict(LinearSVMProbe(), res.layer(layer).numpy(), y, cv=folds)
        assert svm_result.metrics["accuracy"][layer] == np.mean(pred == y)


def test_parallel_layers_give_identical_results(data, svm_result):
    r2 = ls.probe_layers(data[0], classifier="svm", cv=5, n_jobs=2, progress=False)
    for k in ("accuracy", "shuffled_accuracy", "auroc", "direction_cosine"):
        np.testing.assert_array_equal(r2.metrics[k], svm_result.metrics[k])


def test_diffmeans_direction_matches_planted_vector(data):
    res, u = data
    r = ls.probe_layers(res, classifier="diffmeans", controls=False, progress=False)
    # classes sorted: ['harmful', 'harmless'] -> direction_ points harmful -> harmless = -u
    assert float(r.probes[2].direction_ @ u[0]) < -0.99
    dirs = refusal_directions(res)
    assert dirs.shape == (5, 16)
    assert float(dirs[2].double() @ torch.from_numpy(u[0])) > 0.99
    assert float(dirs[0].norm()) == 0.0  # identical embedding features: no direction
    assert r.metrics["direction_cosine"][2] == pytest.approx(1.0, abs=1e-9)


def test_svm_weight_aligns_with_difference_of_means(svm_result, data):
    # oriented towards 'harmful' in the raw feature space (StandardScaler undone)
    assert svm_result.metrics["direction_cosine"][2] > 0.8
    w = svm_result.weight_directions()[2]
    assert float(w @ data[1][0]) > 0.8


# -- intervals ---------------------------------------------------------------------------

def test_wilson_matches_scipy_and_narrows_with_n():
    from scipy.stats import binomtest

    for k, n in [(8, 10), (50, 100), (100, 100), (0, 30)]:
        ref = binomtest(k, n).proportion_ci(method="wilson")
        lo, hi = wilson_interval(k, n)
        assert float(lo) == pytest.approx(ref.low, abs=1e-12) and float(hi) == pytest.approx(ref.high, abs=1e-12)
    lo, hi = auroc_interval(0.8, 50, 50)
    assert lo < 0.8 < hi and (hi - lo) > auroc_interval(0.8, 500, 500)[1] - auroc_interval(0.8, 500, 500)[0]


def test_ci_contains_mean_and_narrows_with_more_data():
    small = ls.probe_layers(planted(n_per=40, strength=1.0)[0], controls=False, progress=False)
    big = ls.probe_layers(planted(n_per=400, strength=1.0)[0], controls=False, progress=False)
    for r in (small, big):
        m = r.metrics
        assert np.all(m["ci_low"] <= m["accuracy"]) and np.all(m["accuracy"] <= m["ci_high"])
        assert np.all(m["auroc_low"][1:] <= m["auroc"][1:]) and np.all(m["auroc"][1:] <= m["auroc_high"][1:])
    width = lambda r: r.metrics["ci_high"] - r.metrics["ci_low"]  # noqa: E731
    assert np.all(width(big)[[0, 1, 4]] < width(small)[[0, 1, 4]] * 0.6)


# -- estimators --------------------------------------------------------------------------

@pytest.mark.parametrize("cls", ESTIMATORS)
def test_estimators_are_sklearn_compatible(cls, data):
    res, _ = data
    X, y = res.layer(2).numpy(), np.asarray(res.labels)
    est = cls()
    with pytest.raises(NotFittedError):
        est.predict(X)
    from sklearn.exceptions import NotFittedError as SkNotFitted
    from sklearn.utils.validation import check_is_fitted

    with pytest.raises(SkNotFitted):
        check_is_fitted(est)
    c = clone(est)
    assert c.get_params() == est.get_params() and c is not est
    assert c.fit(X, y) is c and list(c.classes_) == ["harmful", "harmless"]
    check_is_fitted(c)
    assert cross_val_score(cls(), X, y, cv=3).min() >= 0.98
    assert make_pipeline(cls()).fit(X, y).score(X, y) >= 0.99


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_linear_probes_match_sklearn_references(data):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    res, _ = data
    X, y = res.layer(1).numpy().astype(np.float64), np.asarray(res.labels)
    ref = make_pipeline(StandardScaler(), LinearSVC(C=0.01, dual="auto", max_iter=2000, random_state=0)).fit(X, y)
    np.testing.assert_allclose(LinearSVMProbe().fit(X, y).decision_function(X), ref.decision_function(X), atol=1e-9)
    ref = make_pipeline(StandardScaler(), LogisticRegression(max_iter=200)).fit(X, y)
    np.testing.assert_allclose(LogisticProbe().fit(X, y).decision_function(X), ref.decision_function(X), atol=1e-9)
    ref = make_pipeline(StandardScaler(), MLPClassifier((100,), random_state=0)).fit(X, y)
    mlp = MLPProbe().fit(X, y)
    np.testing.assert_allclose(1 / (1 + np.exp(-mlp.decision_function(X))), ref.predict_proba(X)[:, 1], atol=1e-9)
    assert (mlp.predict(X) == ref.predict(X)).all()


def test_diffmeans_threshold_is_midpoint():
    X = np.array([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0], [4.0, 2.0]])
    p = DiffMeansProbe().fit(X, ["a", "a", "b", "b"])
    np.testing.assert_allclose(p.direction_, [1.0, 0.0])
    assert p.threshold_[0] == 2.0
    assert p.predict([[1.9, 5.0], [2.1, -3.0]]).tolist() == ["a", "b"]
    same = DiffMeansProbe().fit(np.ones((4, 2)), ["a", "b", "b", "b"])  # no direction: majority class
    assert same.predict(np.ones((2, 2))).tolist() == ["b", "b"]


# -- 3-way, positions=k, transfer ----------------------------------------------------------

def test_three_way_task():
    res, _ = planted(n_per=60, classes=("harmful", "jailbreak", "harmless"))
    r = ls.probe_layers(res, classifier="logistic", progress=False)
    assert r.chance == pytest.approx(1 / 3)
    assert r.metrics["accuracy"][2] == 1.0 and abs(r.metrics["accuracy"][4] - 1 / 3) < 0.12
    assert np.isnan(r.metrics["auroc"]).all() and r.positive is None
    assert r.decision_function(res).shape == (180, 5, 3)
    with pytest.raises(InputError, match="binary"):
        ls.probe_layers(res, classifier="diffmeans", progress=False)


def test_positions_k_uses_last_position(data):
    res, _ = data
    noise = torch.randn(res.values.shape, generator=torch.Generator().manual_seed(0))
    v = torch.stack([noise, res.values], dim=2)  # [n, layer, 2, d]; signal at pos -1
    res4 = ls.Residuals(v, res.prompts, res.n_tokens, "synth", "hash", 2)
    r = ls.probe_layers(res4, controls=False, layers=[2, 4], progress=False)
    assert r.layers == [2, 4] and r.metrics["accuracy"][0] >= 0.99 and r.metrics["accuracy"][1] < 0.6


def test_transfer_jailbreak_fools_late_layer_only(data, svm_result):
    # jailbreaks: harmful signal at layer 2 but not at layer 3 (the "middle" is broken)
    jb, _ = planted(n_per=50, layers=(2,), seed=7)
    jb = jb.subset(np.arange(50))  # the shifted ('harmful') rows only
    t = svm_result.transfer_to(jb)
    assert t.positive == "harmful" and t.n == 50
    assert t.positive_rate[2] == 1.0 and t.positive_rate[3] < 0.2
    assert t.rate_low[2] < 1.0 and t.rate_high[3] > t.positive_rate[3]
    assert t.to_frame().accuracy[2] == 1.0  # their labels ('harmful') are a known class
    # the function form trains the same probes on all data: identical rates
    t2 = probe_transfer(data[0], jb)
    np.testing.assert_array_equal(t2.positive_rate, t.positive_rate)
    # an unknown test label ('jailbreak') has no accuracy, only rates
    relabelled = ls.Residuals(jb.values, jb.prompts.relabel("jailbreak"), jb.n_tokens, "synth", "hash", "last")
    t3 = ls.probes.transfer_to(svm_result, relabelled)
    assert np.isnan(t3.accuracy).all()
    np.testing.assert_array_equal(t3.positive_rate, t.positive_rate)
    # one fitted estimator at one layer
    t4 = ls.probes.transfer_to(svm_result.probes[2], relabelled, layer=2)
    assert t4.layers == [2] and t4.positive_rate[0] == t.positive_rate[2]
    with pytest.raises(InputError, match="layer="):
        ls.probes.transfer_to(svm_result.probes[2], relabelled)


def test_cross_dataset_transfer_accuracy():
    train, _ = planted(seed=0)
    rng = np.random.default_rng(1)
    test, _ = planted(seed=0, n_per=100)
    test = ls.Residuals(test.values + torch.from_numpy(0.3 * rng.normal(size=test.values.shape).astype(np.float32)),
                        test.prompts, test.n_tokens, "synth", "hash", "last")
    t = probe_transfer(train, test, layers=[1, 2, 3])
    assert t.accuracy[1] > 0.8 and t.accuracy[2] > 0.95 and t.layers == [1, 2, 3]


# -- persistence and scoring ---------------------------------------------------------------

@pytest.mark.parametrize("clf", ["svm", "logistic", "mlp", "diffmeans"])
def test_save_load_round_trips_predictions(clf, data, tmp_path):
    res, _ = data
    r = ls.probe_layers(res, classifier=clf, controls=False, progress=False, cv=3)
    path = r.save(tmp_path / "probe")
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "probes.safetensors"]
    back = ProbeResult.load(path)
    np.testing.assert_array_equal(back.decision_function(res), r.decision_function(res))
    np.testing.assert_array_equal(back.predict(res), r.predict(res))
    assert back.to_frame().equals(r.to_frame())
    assert (r.predict(res)[:, 2] == np.asarray(res.labels)).all()


def test_predict_rejects_other_model(svm_result, data):
    other = ls.Residuals(data[0].values, data[0].prompts, data[0].n_tokens, "other", "otherhash", "last")
    with pytest.raises(ModelMismatchError, match="same model"):
        svm_result.predict(other)


def test_relative_depth_and_plot(svm_result):
    deep, _ = planted(n_layers=8, layers=(4, 5, 6))
    r8 = ls.probe_layers(deep, controls=False, progress=False)
    df = relative_depth_frame({"a": svm_result, "b": r8})
    assert df.groupby("name").relative_depth.max().tolist() == [1.0, 1.0]
    assert df[df.name == "b"].relative_depth.tolist()[4] == 0.5
    fig = svm_result.plot(others={"deep": r8}, relative_depth=True)
    ax = fig.axes[0]
    assert ax.lines[0].get_xdata().tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    import matplotlib.pyplot as plt

    plt.close(fig)


# -- bad input -----------------------------------------------------------------------------

def test_bad_inputs(data):
    res, _ = data
    with pytest.raises(InputError, match="two classes"):
        ls.probe_layers(res.subset(np.arange(100)), progress=False)
    with pytest.raises(InputError, match="at least 5 samples per class"):
        ls.probe_layers(res.subset([0, 1, 2, 100, 101, 102, 103, 104]), progress=False)
    with pytest.raises(InputError, match="one label per prompt"):
        ls.probe_layers(res, labels=["harmful"] * 10, progress=False)
    v = res.values.clone()
    v[3, 2, 0] = float("nan")
    v[5, 4, 1] = float("inf")
    bad = ls.Residuals(v, res.prompts, res.n_tokens, "synth", "hash", "last")
    with pytest.raises(InputError, match=r"layer\(s\) \[2, 4\]"):
        ls.probe_layers(bad, progress=False)
    assert ls.probe_layers(bad, layers=[1, 3], controls=False, progress=False).layers == [1, 3]
    with pytest.raises(InputError, match="classifier must be"):
        ls.probe_layers(res, classifier="forest", progress=False)
    with pytest.raises(InputError, match="layer must be"):
        ls.probe_layers(res, layers=[9], progress=False)
    with pytest.raises(InputError, match="cv must be"):
        ls.probe_layers(res, cv=1, progress=False)
    with pytest.raises(InputError, match="No prompt has label"):
        refusal_directions(res, positive="jailbreak")


# -- real model ----------------------------------------------------------------------------

@pytest.mark.real
def test_real_model_probe_separates_harmful(real_model):
    ps = ls.load_prompts("harmbench").sample(24, seed=0) + ls.load_prompts("harmless").sample(24, seed=0)
    assert sorted(set(ps.labels)) == ["harmful", "harmless"]
    acts = ls.collect_residuals(real_model, ps, cache=False, progress=False)
    r = ls.probe_layers(acts, classifier="svm", cv=4, progress=False)
    acc, auroc = r.metrics["accuracy"], r.metrics["auroc"]
    # harmless is matched to harmbench in form and topic, so 48 prompts give ~0.8 (0.95 needs ~570)
    assert acc[6:19].max() >= 0.75 and auroc[6:19].max() >= 0.85
    # every prompt ends on the same template token: identical layer-0 features, exactly chance
    assert acc[0] == 0.5 and r.embedding_at_chance
