"""Probes: planted directions are recovered, controls sit at chance, CIs behave, artifacts round-trip."""

from __future__ import annotations

from dataclasses import replace

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
    request_groups,
    wilson_interval,
)
from lens_safety.prompts import PromptSet

ESTIMATORS = [LinearSVMProbe, LogisticProbe, MLPProbe, DiffMeansProbe]
GENERIC_EARLY_MIN = 0.95  # measured on the default model: see the real-tier test


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


def renamed(res, prefix):
    """The same residuals, but every prompt asks a new request (``prefix i``)."""
    ps = PromptSet.from_texts([f"{prefix} {i}" for i in range(len(res))], label=res.labels[0])
    ps = PromptSet([replace(p, label=lab) for p, lab in zip(ps, res.labels)])
    return ls.Residuals(res.values, ps, res.n_tokens, res.model_name, res.weights_hash, res.positions,
                        dict(res.formatting))


def test_transfer_jailbreak_fools_late_layer_only(data, svm_result):
    # jailbreaks: harmful signal at layer 2 but not at layer 3 (the "middle" is broken); new requests
    jb, _ = planted(n_per=50, layers=(2,), seed=7)
    jb = renamed(jb.subset(np.arange(50)), "unseen request")  # the shifted ('harmful') rows only
    t = svm_result.transfer_to(jb)
    assert t.positive == "harmful" and t.n == 50 and t.n_seen == 0
    assert t.positive_rate[2] == 1.0 and t.positive_rate[3] < 0.2
    assert t.rate_low[2] < 1.0 and t.rate_high[3] > t.positive_rate[3]
    assert t.to_frame().accuracy[2] == 1.0  # their labels ('harmful') are a known class
    # the function form trains the same probes on all data (no request is shared): identical rates
    t2 = probe_transfer(data[0], jb)
    assert t2.n_seen == 0 and t2.holdout == "crossfit"
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
    fig = t.plot()
    assert fig.axes[0].lines[0].get_ydata().tolist() == t.positive_rate.tolist()
    import matplotlib.pyplot as plt

    plt.close(fig)


def memorisable(n_req=60, n_jb=30, d=16, seed=0):
    """Plain harmful/harmless requests and jailbreaks of the first ``n_jb`` harmful ones.

    Layer 1 holds only each request's identity (a random vector shared by the request and its
    wrappers, no class signal): a probe that memorises requests reads "harmful" off it. Layer 2
    adds a real harmful-vs-harmless signal that the jailbreaks keep."""
    rng = np.random.default_rng(seed)
    harmful = PromptSet.from_texts([f"bad request {i}" for i in range(n_req)], label="harmful")
    harmless = PromptSet.from_texts([f"good request {i}" for i in range(n_req)], label="harmless")
    ident = rng.normal(size=(2 * n_req, d)) * 3
    signal = np.zeros(d)
    signal[0] = 12.0
    v = np.zeros((2 * n_req, 3, d))
    v[:, 1] = ident
    v[:, 2] = ident + np.where(np.arange(2 * n_req)[:, None] < n_req, signal, -signal)
    train = ls.Residuals(torch.from_numpy(v.astype(np.float32)), harmful + harmless,
                         torch.full((2 * n_req,), 12), "synth", "hash", "last")
    jb = ls.jailbreak(harmful[:n_jb], "prefix_injection")
    vj = v[:n_jb] + rng.normal(size=(n_jb, 3, d)) * 0.1
    test = ls.Residuals(torch.from_numpy(vj.astype(np.float32)), jb, torch.full((n_jb,), 30), "synth", "hash",
                        "last")
    return train, test


def test_transfer_cross_fits_by_request_against_a_planted_memoriser():
    from sklearn.neighbors import KNeighborsClassifier

    train, test = memorisable()
    knn = KNeighborsClassifier(n_neighbors=1)
    leaky = probe_transfer(train, test, classifier=knn, holdout=None)
    assert leaky.n_seen == 30 and leaky.holdout == "none"
    assert leaky.positive_rate[1] == 1.0  # every jailbreak finds its own plain request: pure memorisation
    fair = probe_transfer(train, test, classifier=knn)
    assert fair.holdout == "crossfit" and fair.n_seen == 30
    # without the memorised request, layer 1 carries no class information: about half are called harmful
    assert fair.positive_rate[1] < 0.8 and fair.rate_low[1] < 0.5 < fair.rate_high[1]
    assert fair.positive_rate[2] == 1.0 and leaky.positive_rate[2] == 1.0  # a real signal survives
    excl = probe_transfer(train, test, classifier=knn, holdout="exclude")
    assert excl.positive_rate[1] < 0.8 and excl.positive_rate[2] == 1.0
    # hand-made cross-fit reference for layer 1: hold out each block of requests in turn
    X, y = train.layer(1).numpy(), np.asarray(train.labels)
    Xt = test.layer(1).numpy()
    shared = np.unique(request_groups(test))
    shared = shared[np.random.default_rng(0).permutation(len(shared))]
    gtr, gte = request_groups(train), request_groups(test)
    ref = np.empty(len(Xt), dtype=object)
    for chunk in np.array_split(shared, 5):
        rows = np.isin(gte, chunk)
        ref[rows] = clone(knn).fit(X[~np.isin(gtr, chunk)], y[~np.isin(gtr, chunk)]).predict(Xt[rows])
    assert fair.positive_rate[1] == np.mean(ref == "harmful")
    # a ProbeResult trained on these requests refuses to score their jailbreaks unless asked
    r = ls.probe_layers(train, classifier="svm", controls=False, progress=False)
    assert r.seen_requests(test).all()
    with pytest.raises(InputError, match="30 of 30 test prompts ask a request"):
        r.transfer_to(test)
    assert r.transfer_to(test, allow_seen=True).n_seen == 30
    with pytest.raises(InputError, match="holdout must be"):
        probe_transfer(train, test, holdout="drop")


def test_cross_dataset_transfer_accuracy():
    train, _ = planted(seed=0)
    rng = np.random.default_rng(1)
    test, _ = planted(seed=0, n_per=100)
    test = ls.Residuals(test.values + torch.from_numpy(0.3 * rng.normal(size=test.values.shape).astype(np.float32)),
                        test.prompts, test.n_tokens, "synth", "hash", "last")
    t = probe_transfer(train, test, layers=[1, 2, 3])
    assert t.accuracy[1] > 0.8 and t.accuracy[2] > 0.95 and t.layers == [1, 2, 3]


# -- groups, splitters, AUROC over folds, permutation test, length control --------------------

def twins(n_req=40, d=8, seed=0):
    """Each request twice (plain + wrapped), a random a/b label per request, features = the
    request's identity only: a memoriser scores well only if a twin sits in the training fold."""
    rng = np.random.default_rng(seed)
    ps = PromptSet.from_texts([f"request {i}" for i in range(n_req)], label="harmful")
    both = ps + ls.jailbreak(ps, "prefix_injection")
    ident = rng.normal(size=(n_req, d))
    v = np.concatenate([ident, ident + 0.05 * rng.normal(size=(n_req, d))])[:, None, :].repeat(2, axis=1)
    labels = np.tile(rng.permutation(np.array(["a", "b"] * (n_req // 2))), 2)
    res = ls.Residuals(torch.from_numpy(v.astype(np.float32)), both, torch.full((2 * n_req,), 9), "synth", "hash",
                       "last")
    return res, labels


def test_groups_keep_a_request_and_its_wrappers_apart():
    from sklearn.neighbors import KNeighborsClassifier

    res, labels = twins()
    knn = KNeighborsClassifier(n_neighbors=1)
    kw = dict(labels=labels, classifier=knn, controls=False, refit=False, progress=False, layers=[1])
    leaky = ls.probe_layers(res, groups=None, **kw)
    fair = ls.probe_layers(res, **kw)  # default groups="request"
    assert "StratifiedKFold" in leaky.params["splitter"] and "StratifiedGroupKFold" in fair.params["splitter"]
    assert fair.params["n_groups"] == 40
    assert leaky.metrics["accuracy"][0] >= 0.75  # the twin in the training fold gives the label away
    assert fair.metrics["ci_low"][0] < 0.5 < fair.metrics["ci_high"][0]  # no twin: chance
    # a splitter object with groups; equal to scikit-learn's own cross_val_predict
    from sklearn.model_selection import GroupKFold, ShuffleSplit, StratifiedKFold

    r = ls.probe_layers(res, cv=GroupKFold(4), **kw)
    ref = cross_val_predict(knn, res.layer(1).numpy(), labels, cv=GroupKFold(4), groups=request_groups(res))
    assert r.metrics["accuracy"][0] == np.mean(ref == labels) and r.cv == 4
    with pytest.raises(InputError, match="both train and test"):
        ls.probe_layers(res, cv=StratifiedKFold(5, shuffle=True, random_state=0), **kw)
    assert ls.probe_layers(res, cv=StratifiedKFold(5), groups=None, **kw).cv == 5
    with pytest.raises(InputError, match="exactly one test fold"):
        ls.probe_layers(res, cv=ShuffleSplit(3, random_state=0), groups=None, **kw)
    with pytest.raises(InputError, match="splitter"):
        ls.probe_layers(res, cv="five", **kw)
    with pytest.raises(InputError, match="one group per prompt"):
        ls.probe_layers(res, groups=[1, 2, 3], **kw)
    with pytest.raises(InputError, match="groups must be"):
        ls.probe_layers(res, groups="method", **kw)


def test_auroc_is_the_mean_over_folds(data, svm_result):
    from sklearn.metrics import roc_auc_score

    res, _ = data
    y = np.asarray(res.labels)
    X = res.layer(1).numpy().astype(np.float64)
    aucs = []
    for tr, te in StratifiedKFold(5, shuffle=True, random_state=0).split(X, y):
        m = LinearSVMProbe().fit(X[tr], y[tr])
        aucs.append(roc_auc_score(y[te] == "harmless", m.decision_function(X[te])))
    assert svm_result.metrics["auroc"][1] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert svm_result.metrics["auroc_fold_std"][1] == pytest.approx(np.std(aucs, ddof=1), abs=1e-12)
    lo, hi = auroc_interval(np.mean(aucs), 100, 100)
    assert (svm_result.metrics["auroc_low"][1], svm_result.metrics["auroc_high"][1]) == (lo, hi)


def test_permutation_test_at_the_best_layer(data, svm_result):
    m = svm_result.metrics
    best = svm_result.best_layer().layer
    assert best == 2 and svm_result.params["n_permutations"] == 20
    assert m["permutation_pvalue"][2] == pytest.approx(1 / 21)  # no permutation reaches 1.0
    assert m["permutation_null_high"][2] < 0.62
    assert np.isnan(m["permutation_pvalue"][[0, 1, 3, 4]]).all()
    r = ls.probe_layers(data[0], layers=[1, 2], n_permutations=9, permutation_layers="all", progress=False)
    p = r.metrics["permutation_pvalue"]
    assert p[1] == pytest.approx(0.1) and p[0] > 0.1  # layer 1 holds no signal
    r0 = ls.probe_layers(data[0], layers=[2], n_permutations=0, progress=False)
    assert np.isnan(r0.metrics["permutation_pvalue"]).all()
    with pytest.raises(InputError, match="permutation_layers"):
        ls.probe_layers(data[0], layers=[2], permutation_layers=[3], progress=False)
    with pytest.raises(InputError, match="n_permutations"):
        ls.probe_layers(data[0], n_permutations=-1, progress=False)


def test_length_control_on_the_three_way_task():
    res, _ = planted(n_per=60, classes=("harmful", "jailbreak", "harmless"))
    n_tok = res.n_tokens.clone()
    n_tok[60:120] += 200  # jailbreak prompts are much longer
    res = ls.Residuals(res.values, res.prompts, n_tok, "synth", "hash", "last")
    r = ls.probe_layers(res, classifier="logistic", controls=False, progress=False)  # length is always computed
    # length alone finds the jailbreaks (1/3 of rows) and guesses between the other two classes
    assert 0.6 <= r.metrics["length_accuracy"][0] <= 0.75 and np.isnan(r.metrics["shuffled_accuracy"]).all()


# -- stage agreement -----------------------------------------------------------------------

CHAT = {"chat": True, "system": None, "template_sha256": "abc"}
RAW = {"chat": False, "system": None, "template_sha256": None}


def test_probes_refuse_residuals_formatted_otherwise(data, tmp_path):
    res, _ = data
    chat = ls.Residuals(res.values, res.prompts, res.n_tokens, "synth", "hash", "last", dict(CHAT))
    r = ls.probe_layers(chat, layers=[2], controls=False, progress=False)
    assert r.formatting == CHAT and r.positions == "last"
    new = renamed(res, "fresh")
    raw = ls.Residuals(new.values, new.prompts, new.n_tokens, "synth", "hash", "last", dict(RAW))
    for call in (r.predict, r.decision_function, r.transfer_to):
        with pytest.raises(ModelMismatchError, match="formatted as chat=True"):
            call(raw)
    with pytest.raises(ModelMismatchError, match="chat= and system="):
        probe_transfer(chat, raw)
    system = ls.Residuals(new.values, new.prompts, new.n_tokens, "synth", "hash", "last", dict(CHAT, system="Be nice"))
    with pytest.raises(ModelMismatchError, match="Be nice"):
        r.predict(system)
    mean = ls.Residuals(new.values, new.prompts, new.n_tokens, "synth", "hash", "mean", dict(CHAT))
    with pytest.raises(ModelMismatchError, match="positions='last'"):
        r.predict(mean)
    # positions=k ends on the same last token: accepted
    k2 = ls.Residuals(torch.stack([new.values, new.values], dim=2), new.prompts, new.n_tokens, "synth", "hash", 2,
                      dict(CHAT))
    assert (r.predict(k2) == r.predict(ls.Residuals(new.values, new.prompts, new.n_tokens, "synth", "hash", "last",
                                                    dict(CHAT)))).all()
    back = ProbeResult.load(r.save(tmp_path / "p"))
    assert back.formatting == CHAT and back.request_keys == r.request_keys
    with pytest.raises(ModelMismatchError, match="formatted"):
        back.predict(raw)


# -- persistence and scoring ---------------------------------------------------------------

@pytest.mark.parametrize("clf", ["svm", "logistic", "mlp", "diffmeans"])
def test_save_load_round_trips_predictions(clf, data, tmp_path):
    res, _ = data
    r = ls.probe_layers(res, classifier=clf, controls=False, progress=False, cv=3)
    path = r.save(tmp_path / "probe")
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "tensors.safetensors"]
    back = ProbeResult.load(path)
    np.testing.assert_array_equal(back.decision_function(res), r.decision_function(res))
    np.testing.assert_array_equal(back.predict(res), r.predict(res))
    assert back.to_frame().equals(r.to_frame())
    assert (r.predict(res)[:, 2] == np.asarray(res.labels)).all()


def test_corrupted_or_edited_saves_raise_cache_error(data, tmp_path):
    import json

    from lens_safety.errors import CacheError

    r = ls.probe_layers(data[0], layers=[1, 2], controls=False, progress=False, cv=3)
    path = r.save(tmp_path / "probe")
    blob = (path / "tensors.safetensors").read_bytes()
    (path / "tensors.safetensors").write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(CacheError, match="sha256"):
        ProbeResult.load(path)
    path = r.save(tmp_path / "probe")
    meta = json.loads((path / "meta.json").read_text())
    meta["metrics"]["accuracy"][0] = 0.99  # a number edited by hand
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="edited or corrupted"):
        ProbeResult.load(path)
    (path / "meta.json").write_text("{\"kind\": ")  # truncated JSON
    with pytest.raises(CacheError, match="not valid JSON"):
        ProbeResult.load(path)
    with pytest.raises(CacheError, match="does not exist"):
        ProbeResult.load(tmp_path / "nowhere")
    back = ProbeResult.load(r.save(tmp_path / "probe"))  # a fresh save replaces the broken folder
    np.testing.assert_array_equal(back.metrics["accuracy"], r.metrics["accuracy"])


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


# -- claim 1's verdict ------------------------------------------------------------------------

def hand_result(acc, ci=0.03, n_layers=None, **metrics):
    acc = np.asarray(acc, dtype=float)
    m = {"accuracy": acc, "ci_low": acc - ci, "ci_high": np.minimum(acc + ci, 1.0), **metrics}
    return ProbeResult(layers=list(range(len(acc))), metrics=m, classes=["harmful", "harmless"], classifier="svm",
                       task="2-way", n=400, cv=5, seed=0, n_layers=n_layers or len(acc) - 1, chance=0.5)


def test_claim1_verdict_rules():
    from lens_safety.probes import claim1_verdict

    curve = [0.5, 0.8, 0.9, 0.93, 0.96, 0.97, 0.97, 0.98, 0.98]  # 8 blocks: early = max(2, ceil(8 / 4)) = 2
    v = claim1_verdict(hand_result(curve))
    # first >= 0.95 after the early layers: partly; within them: reproduced
    assert v.early == 2 and v.verdict == "partly" and v.first.layer == 4
    assert "only from layer 4" in v.reason and "best early layer: layer 2 (0.900" in v.reason
    v4 = claim1_verdict(hand_result(curve), early=4)
    assert v4.verdict == "reproduced" and v4.first == (4, 0.96, pytest.approx(0.93), pytest.approx(0.99))
    assert "layer 4 (0.960, 95% CI 0.930–0.990)" in v4.reason
    # no layer reaches 0.95: partly only if some layer's CI includes it
    flat = [0.5, 0.9, 0.93, 0.94, 0.92]
    v = claim1_verdict(hand_result(flat, ci=0.01), early=2)
    assert v.verdict == "partly" and "CI of layer 3 (0.940, 95% CI 0.930–0.950) includes it" in v.reason
    assert claim1_verdict(hand_result(flat, ci=0.005), early=2).verdict == "not reproduced"
    assert claim1_verdict(hand_result([0.5] * 19 + [0.9]), early=None).early == 5  # ceil(19 / 4)
    # the embedding layer never counts
    assert claim1_verdict(hand_result([0.97, 0.6, 0.7, 0.8, 0.9], ci=0.01), early=2).verdict == "not reproduced"
    # a planted separation from layer 1 on: reproduced, with controls in the reason
    res, _ = planted(layers=(1, 2, 3))
    r = ls.probe_layers(res, controls=True, n_permutations=0, progress=False)
    v = claim1_verdict(r, name="planted")
    assert v.verdict == "reproduced" and v.first.layer == 1 and v.embedding_at_chance
    assert v.shuffled_max < 0.65 and "length-only control" in v.reason and str(v).startswith("planted: reproduced")
    df = v.to_frame()
    assert df.loc[0, "verdict"] == "reproduced" and df.loc[0, "first_layer"] == 1 and df.loc[0, "best_accuracy"] == 1
    fig = v.plot(others=[claim1_verdict(hand_result(curve), name="other")])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "planted: reproduced" in labels and "other: partly" in labels
    import matplotlib.pyplot as plt

    plt.close(fig)
    with pytest.raises(InputError, match="early must be"):
        claim1_verdict(r, early=0)
    with pytest.raises(InputError, match="threshold"):
        claim1_verdict(r, threshold=95)
    with pytest.raises(InputError, match="ProbeResult"):
        claim1_verdict(r.to_frame())


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
def test_real_model_probe_separates_harmful_and_generic_set_earlier(real_model):
    from lens_safety.probes import claim1_verdict

    hb = ls.load_prompts("harmbench").sample(24, seed=0)
    matched, generic = (ls.load_prompts(name).sample(24, seed=0) for name in ("harmless", "generic"))
    acts = ls.collect_residuals(real_model, hb + matched + generic, cache=False, progress=False)
    two = acts.subset(range(48))
    assert sorted(set(two.labels)) == ["harmful", "harmless"]
    r = ls.probe_layers(two, classifier="svm", cv=4, n_permutations=0, progress=False)
    acc, auroc = r.metrics["accuracy"], r.metrics["auroc"]
    # harmless is matched to harmbench in form and topic, so 48 prompts give ~0.8 (0.95 needs ~570)
    assert acc[6:19].max() >= 0.75 and auroc[6:19].max() >= 0.85
    # every prompt ends on the same template token: identical layer-0 features, exactly chance
    assert acc[0] == 0.5 and r.embedding_at_chance
    # the paper-style generic set separates within the first layers: the topic/form confound
    gen = acts.subset(list(range(24)) + list(range(48, 72)))
    rg = ls.probe_layers(gen, classifier="svm", cv=4, controls=False, layers=range(7), progress=False)
    early_generic, early_matched = rg.metrics["accuracy"][1:4].max(), acc[1:4].max()
    assert early_generic >= GENERIC_EARLY_MIN and early_generic >= early_matched + 0.1
    assert claim1_verdict(rg).verdict == "reproduced"
    # probes refuse residuals formatted otherwise (raw text instead of the chat template)
    raw = ls.collect_residuals(real_model, generic[:3], chat=False, cache=False, progress=False)
    with pytest.raises(ModelMismatchError, match="chat=True"):
        r.predict(raw)
