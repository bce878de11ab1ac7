"""Hub ids where a path is expected: recipes, ``hm3.load`` and ``hm3 inspect`` download a snapshot
(``huggingface_hub.snapshot_download``, replaced here by a stand-in that serves local directories:
the hub is unreachable from the test machines)."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

import hm3
from hm3.cli import app
from hm3.errors import HM3Error
from hm3.io import HUB_PATTERNS, HUB_PICKLE_PATTERNS, resolve


@pytest.fixture
def hub(tiny, monkeypatch):
    """A fake hub of the tiny models (``org/base``, ``org/a``, ``org/b``); records each download."""
    import huggingface_hub

    repos = {"org/base": tiny["base"], "org/a": tiny["a"], "org/b": tiny["b"]}
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, list(allow_patterns)))
        if repo_id not in repos:
            raise FileNotFoundError(f"404 Client Error: repository {repo_id} not found")
        return str(repos[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_a_recipe_of_hub_ids_merges(hub, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": "org/base", "seed": 0,
        "models": [{"model": "org/a", "group": "a", "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": "org/b", "group": "b", "parameters": {"weight": 1.0, "density": 0.5}}]}))
    out = hm3.merge(recipe, tmp_path / "merged", progress=False).path
    assert {r for r, _ in hub} == {"org/base", "org/a", "org/b"}
    assert all(p == HUB_PATTERNS for _, p in hub)  # no pickles without --allow-pickle
    assert not any(p.endswith(".bin") for p in HUB_PATTERNS)
    clf = hm3.load(out)
    assert set(clf.groups) == {"a", "b"}


def test_load_and_inspect_take_a_hub_id(hub):
    clf = hm3.load("org/a")
    assert clf.groups == ["a"]  # named after the snapshot folder, as a local directory would be
    result = CliRunner().invoke(app, ["inspect", "org/b"])
    assert result.exit_code == 0, result.output
    assert [r for r, _ in hub] == ["org/a", "org/b"]


def test_allow_pickle_also_downloads_pickled_checkpoints(hub):
    resolve("org/a", allow_pickle=True)
    assert hub == [("org/a", HUB_PATTERNS + HUB_PICKLE_PATTERNS)]


def test_a_failed_download_names_the_id_and_the_fix(hub, tmp_path):
    with pytest.raises(HM3Error, match=r"org/missing: not a local directory and the hub download failed "
                                       r"\(FileNotFoundError: 404.*pass a local model directory"):
        resolve("org/missing")
    # A path-like reference is never sent to the hub.
    for ref in ("./no/such", str(tmp_path / "no-such"), "a/b/c"):
        with pytest.raises(HM3Error, match="no such model directory"):
            resolve(ref)
    assert [r for r, _ in hub] == ["org/missing"]
