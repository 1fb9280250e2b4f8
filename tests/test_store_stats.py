"""store.py (artifacts) and stats.py (intervals) against independent references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lens_safety import stats, store
from lens_safety.errors import CacheError, InputError


def _write(tmp_path, **kw):
    return store.write_artifact(tmp_path / "a", kind="demo", schema_version=3, meta={"x": 1.5, "nan": float("nan")},
                                tensors={"w": torch.arange(6.0).reshape(2, 3), "i": np.arange(4)}, **kw)


def test_artifact_round_trip_is_exact(tmp_path):
    d = _write(tmp_path)
    tensors, meta = store.read_artifact(d, kind="demo", schema_version=3)
    assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3))
    assert tensors["i"].tolist() == [0, 1, 2, 3]
    assert meta["x"] == 1.5 and meta["nan"] is None  # non-finite floats become null, never invalid JSON
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary folder or file left behind


@pytest.mark.parametrize("damage", ["truncate_tensors", "flip_byte", "edit_meta", "bad_json", "drop_tensors"])
def test_every_kind_of_damage_is_detected(tmp_path, damage):
    d = _write(tmp_path)
    t, m = d / store.TENSORS, d / store.META
    if damage == "truncate_tensors":
        t.write_bytes(t.read_bytes()[:-8])
    elif damage == "flip_byte":  # same size: only a hash can see it
        b = bytearray(t.read_bytes())
        b[-1] ^= 0xFF
        t.write_bytes(bytes(b))
    elif damage == "edit_meta":
        doc = json.loads(m.read_text())
        doc["x"] = 2.5
        m.write_text(json.dumps(doc))
    elif damage == "bad_json":
        m.write_text(m.read_text()[:20])
    else:
        t.unlink()
    with pytest.raises(CacheError):
        store.read_artifact(d, kind="demo", schema_version=3)


def test_wrong_kind_or_schema_is_refused(tmp_path):
    d = _write(tmp_path)
    with pytest.raises(CacheError, match="not a 'other'"):
        store.read_artifact(d, kind="other", schema_version=3)
    with pytest.raises(CacheError, match="schema 3"):
        store.read_artifact(d, kind="demo", schema_version=4)


def test_atomic_dir_keeps_the_old_folder_on_failure(tmp_path):
    d = _write(tmp_path)
    with pytest.raises(RuntimeError):
        with store.atomic_dir(d) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash mid-write")
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    assert store.read_artifact(d, kind="demo", schema_version=3)[1]["x"] == 1.5


def test_atomic_dir_refuses_to_wipe_a_folder_it_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for write in (lambda: store.write_artifact(mine, kind="demo", schema_version=3, meta={}),
                  lambda: store.atomic_dir(mine).__enter__()):
        with pytest.raises(InputError, match=f"{mine}.*did not write.*new or empty folder"):
            write()
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"] and (mine / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # and no temporary folder left
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="file or a symbolic link, not a folder"):
        store.write_artifact(tmp_path / "file", kind="demo", schema_version=3, meta={})
    (mine / "thesis.tex").unlink()  # an empty folder, or one of ours (any kind), is replaced
    store.write_artifact(mine, kind="demo", schema_version=3, meta={"n": 1})
    store.write_artifact(mine, kind="other", schema_version=1, meta={"n": 2})
    assert store.read_artifact(mine, kind="other", schema_version=1)[1]["n"] == 2
    (mine / store.META).write_text((mine / store.META).read_text()[:20])  # damaged, still ours: rebuilt
    store.write_artifact(mine, kind="other", schema_version=1, meta={"n": 3})
    assert store.read_artifact(mine, kind="other", schema_version=1)[1]["n"] == 3
    (mine / store.META).write_text('{"name": "my own meta.json"}')  # valid JSON without a kind: not ours
    with pytest.raises(InputError, match="did not write"):
        store.write_artifact(mine, kind="other", schema_version=1, meta={})


def test_atomic_dir_refuses_a_folder_that_appears_during_the_write(tmp_path):
    d = tmp_path / "a"
    with pytest.raises(InputError, match="did not write"):
        with store.atomic_dir(d) as tmp:
            (tmp / "x").write_text("mine")
            d.mkdir()
            (d / "user.txt").write_text("theirs")
    assert [p.name for p in d.iterdir()] == ["user.txt"] and [p.name for p in tmp_path.iterdir()] == ["a"]


def test_concurrent_writers_never_share_a_temporary_name(tmp_path):
    d = tmp_path / "a"
    with store.atomic_dir(d) as first:
        store.write_json_atomic(first / store.META, {"kind": "demo", "writer": 1})
        with store.atomic_dir(d) as second:  # another process writing the same entry meanwhile
            assert second != first and (first / store.META).is_file()  # the first writer's work is intact
            store.write_json_atomic(second / store.META, {"kind": "demo", "writer": 2})
        assert store.read_json(d / store.META)["writer"] == 2
    assert store.read_json(d / store.META)["writer"] == 1  # last to finish wins, both complete
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    # a file written atomically leaves another writer's temporary file alone (the old fixed name clobbered it)
    (tmp_path / "a.tmp").mkdir()
    (tmp_path / "f.json.tmp").write_text("another writer's half file")
    store.write_artifact(d, kind="demo", schema_version=3, meta={})
    store.write_json_atomic(tmp_path / "f.json", {"x": 1})
    assert (tmp_path / "a.tmp").is_dir() and (tmp_path / "f.json.tmp").read_text() == "another writer's half file"
    assert store.read_json(tmp_path / "f.json") == {"x": 1}


def test_wilson_matches_scipy_binomtest():
    from scipy.stats import binomtest

    for k, n in [(0, 10), (3, 10), (50, 100), (99, 100), (17, 23)]:
        lo, hi = stats.wilson_interval(k, n)
        ref = binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert float(lo) == pytest.approx(ref.low, abs=1e-12) and float(hi) == pytest.approx(ref.high, abs=1e-12)


def test_mean_ci_is_the_student_t_interval():
    from scipy.stats import t as student

    x = np.array([0.3, 0.9, 0.5, 0.7, 0.1])
    m, lo, hi = stats.mean_ci(x, level=0.9)
    ref = student.interval(0.9, len(x) - 1, loc=x.mean(), scale=x.std(ddof=1) / np.sqrt(len(x)))
    assert (m, lo, hi) == pytest.approx((x.mean(), *ref), abs=1e-12)
    with pytest.raises(InputError):
        stats.mean_ci(x, level=95)


def test_bootstrap_ci_covers_the_mean_and_matches_scipy():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(1)
    x = rng.normal(0.4, 0.2, size=12)
    est, lo, hi = stats.bootstrap_ci(x, n_resamples=3000, seed=7)
    ref = bootstrap((x,), np.mean, n_resamples=3000, method="BCa", random_state=np.random.default_rng(7))
    assert est == pytest.approx(x.mean())
    assert (lo, hi) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), abs=1e-12)
    assert stats.bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)  # degenerate: the point itself


def test_permutation_pvalue_counts_ties_and_adds_one():
    assert stats.permutation_pvalue(0.6, [0.6, 0.7, 0.1]) == pytest.approx(3 / 4)
    assert stats.permutation_pvalue(0.1, [0.6, 0.7, 0.1], greater=False) == pytest.approx(2 / 4)
    assert stats.permutation_pvalue(1.0, np.zeros(99)) == pytest.approx(0.01)


def test_auroc_interval_narrows_with_n():
    lo, hi = stats.auroc_interval(0.8, 50, 50)
    lo2, hi2 = stats.auroc_interval(0.8, 500, 500)
    assert lo < lo2 < 0.8 < hi2 < hi
