"""hm3.agreement: label agreement of a merged model with its original guards on unlabelled text."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from hm3.agreement import agreement, recorded_guards
from hm3.cli import app
from hm3.errors import HM3Error

TEXTS = ["w0 w30 w31", "w12 w40", "w3 w31 w7", "w5 w6", "w30 w30 w2", "w41 w42 w43 w1", "w9", "w20 w21 w22"]


@pytest.fixture(scope="module")
def merged(tiny, tmp_path_factory):
    """A linear merge of the tiny guards `a` and `b` (a weak merge: it disagrees with them somewhere)."""
    import hm3

    out = tmp_path_factory.mktemp("agree") / "merged"
    cfg = {"merge_method": "linear", "base_model": str(tiny["base"]), "seed": 0,
           "models": [{"model": str(tiny["a"]), "group": "a"}, {"model": str(tiny["b"]), "group": "b"}]}
    hm3.merge(cfg, out, progress=False)
    return out


def test_counts_match_the_two_models_predictions(tiny, merged):
    from hm3.model import load

    rep = agreement(merged, TEXTS, sure=0.6)  # guards from the recipe recorded in config.json
    assert set(rep.groups) == {"a", "b"}
    clf = load(merged)
    for g in ("a", "b"):
        guard = load(tiny[g])
        want_g = guard.predict_proba(TEXTS)[guard.groups[0]].argmax(1)
        want_m = clf.predict_proba(TEXTS, [g])[g].argmax(1)
        a = rep.groups[g]
        assert a.n == len(TEXTS) and a.agree == int((want_g == want_m).sum())
        assert a.confusion.tolist() == [[int(((want_g == i) & (want_m == j)).sum()) for j in range(len(a.labels))]
                                        for i in range(len(a.labels))]
        assert sorted(d.index for d in a.disagreements) == np.flatnonzero(want_g != want_m).tolist()
        p_guard = guard.predict_proba(TEXTS)[guard.groups[0]].max(1)
        sure = p_guard >= 0.6
        assert (a.sure, a.sure_agree) == (int(sure.sum()), int((sure & (want_g == want_m)).sum()))
        ps = [d.guard_p for d in a.disagreements]
        assert ps == sorted(ps, reverse=True)  # the guard's surest first
        for d in a.disagreements:
            assert d.guard == a.labels[want_g[d.index]] and d.merged == a.labels[want_m[d.index]]
    # the linear merge of two different tasks is not a copy of either guard on every text
    assert sum(a.agree for a in rep.groups.values()) < 2 * len(TEXTS)


def test_a_guard_agrees_with_itself(tiny):
    from hm3.model import load

    group = load(tiny["a"]).groups[0]
    rep = agreement(tiny["a"], TEXTS, {group: tiny["a"]})
    assert rep.groups[group].share == 1.0 and not rep.groups[group].disagreements


def test_bad_guards_are_explained(tiny, merged, tmp_path):
    with pytest.raises(HM3Error, match="has no group 'zzz'"):
        agreement(merged, TEXTS, {"zzz": tiny["a"]})
    with pytest.raises(HM3Error, match="has 3 labels but group 'a'"):
        agreement(merged, TEXTS, {"a": tiny["b"]})
    with pytest.raises(HM3Error, match="sure must be in"):
        agreement(merged, TEXTS, {"a": tiny["a"]}, sure=0)
    with pytest.raises(HM3Error, match="at least one text"):
        agreement(merged, [], {"a": tiny["a"]})
    moved = tmp_path / "moved"
    shutil.copytree(merged, moved)
    cfg = json.loads((moved / "config.json").read_text())
    for m in cfg["hm3"]["recipe"]["models"]:
        m["model"] = str(tmp_path / "gone" / m["group"])
    (moved / "config.json").write_text(json.dumps(cfg))
    assert recorded_guards(moved) == {}
    with pytest.raises(HM3Error, match="records no guard directory that exists here"):
        agreement(moved, TEXTS)


def test_cli_reads_stdin_and_writes_reports(tiny, merged, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["agree", str(merged), "--input", "-", "--guard", f"a={tiny['a']}", "--out",
                            str(tmp_path / "rep"), "--show", "2"], input="\n".join(TEXTS) + "\n")
    assert r.exit_code == 0, r.stderr
    data = json.loads((tmp_path / "rep" / "agreement.json").read_text())
    assert list(data["groups"]) == ["a"] and data["texts"] == len(TEXTS)
    want = agreement(merged, TEXTS, {"a": tiny["a"]}).groups["a"]
    assert data["groups"]["a"]["agree"] == want.agree
    assert "| a |" in (tmp_path / "rep" / "agreement.md").read_text() and "| a |" in r.output
    bad = runner.invoke(app, ["agree", str(merged), "-t", "w0", "--guard", "a"])
    assert bad.exit_code == 2 and "expected GROUP=DIR" in bad.stderr
