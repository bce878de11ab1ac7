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


def test_agreement_per_key(tiny, merged):
    """``by=``: per key (e.g. the text's source), the same counts as the agreement on that key's texts alone."""
    keys = ["x", "y", "x", "z", "y", "x", "z", "z"]
    rep = agreement(merged, TEXTS, by=keys, by_field="source")
    for g, a in rep.groups.items():
        assert list(a.by) == ["x", "y", "z"]  # order of first appearance
        for k in ("x", "y", "z"):
            alone = agreement(merged, [t for t, kk in zip(TEXTS, keys) if kk == k]).groups[g]
            assert a.by[k] == (alone.agree, alone.n)
        assert sum(n for _, n in a.by.values()) == a.n and sum(s for s, _ in a.by.values()) == a.agree
    md = rep.markdown()
    assert "| source | texts | a | b |" in md and "| z | 3 |" in md
    assert rep.to_json()["groups"]["a"]["by"]["x"]["texts"] == 3 and rep.to_json()["by_field"] == "source"
    assert "by" not in agreement(merged, TEXTS).to_json()["groups"]["a"]  # none asked: none reported
    with pytest.raises(HM3Error, match="3 keys .* for 8 texts"):
        agreement(merged, TEXTS, by=["x", "y", "z"])


def test_guard_probabilities_given_once_for_many_models(tiny, merged, monkeypatch):
    """``guard_probs=``: a guard's probabilities computed once (e.g. for many merged models) give the same
    report as running the guard, and that guard is not loaded again; a wrong shape is an error."""
    import hm3.model
    from hm3.model import load

    rep = agreement(merged, TEXTS, sure=0.6)
    probs = {g: load(tiny[g]).predict_proba(TEXTS)[load(tiny[g]).groups[0]] for g in ("a", "b")}
    loaded = []
    real_load = hm3.model.load
    monkeypatch.setattr(hm3.model, "load", lambda path, *a, **k: loaded.append(str(path)) or real_load(path, *a, **k))
    again = agreement(merged, TEXTS, sure=0.6, guard_probs={"a": probs["a"]})
    assert str(tiny["a"]) not in loaded and str(tiny["b"]) in loaded  # only the guard without probabilities ran
    for g in ("a", "b"):
        x, y = rep.groups[g], again.groups[g]
        assert (x.confusion.tolist(), x.sure, x.sure_agree) == (y.confusion.tolist(), y.sure, y.sure_agree)
        assert [d.to_json() for d in x.disagreements] == [d.to_json() for d in y.disagreements]
    with pytest.raises(HM3Error, match=r"guard_probs\['a'\] has shape \(7, 2\), expected 8 texts"):
        agreement(merged, TEXTS, guard_probs={"a": probs["a"][:7]})


def test_cli_by_a_field_of_jsonl_rows(tiny, merged, tmp_path):
    runner = CliRunner()
    rows = tmp_path / "traffic.jsonl"
    rows.write_text("".join(json.dumps({"text": t, "source": "chat" if i % 2 else "mail"}) + "\n"
                            for i, t in enumerate(TEXTS)))
    r = runner.invoke(app, ["agree", str(merged), "-i", str(rows), "--by", "source", "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.stderr
    assert "| source | texts | a | b |" in r.output and "| mail | 4 |" in r.output
    data = json.loads((tmp_path / "rep" / "agreement.json").read_text())
    want = agreement(merged, TEXTS, by=["chat" if i % 2 else "mail" for i in range(len(TEXTS))]).groups["b"].by
    assert {k: (v["agree"], v["texts"]) for k, v in data["groups"]["b"]["by"].items()} == want
    # the field must be there, and only .jsonl rows have fields
    rows.write_text(json.dumps({"text": "w0", "source": "a"}) + "\n" + json.dumps({"text": "w1"}) + "\n")
    bad = runner.invoke(app, ["agree", str(merged), "-i", str(rows), "--by", "source"])
    assert bad.exit_code == 2 and 'traffic.jsonl:2: --by source needs a field "source"' in bad.stderr
    txt = tmp_path / "t.txt"
    txt.write_text("w0\nw1\n")
    bad = runner.invoke(app, ["agree", str(merged), "-i", str(txt), "--by", "source"])
    assert bad.exit_code == 2 and 't.txt: --by source needs .jsonl rows {"text", "source"}' in bad.stderr
    bad = runner.invoke(app, ["agree", str(merged), "-t", "w0", "--by", "source"])
    assert bad.exit_code == 2 and "--by source reads a field of .jsonl rows" in bad.stderr
