"""Streaming merge I/O: tensors read with pread or as copy-on-write maps of their own bytes, and the
merged model written tensor by tensor (``hm3.io.SafetensorsWriter``). The streamed file must be the very bytes the whole-state
writer makes, and load like safetensors' own writer's file."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hm3.errors import HM3Error
from hm3.io import SafetensorsWriter, load_checkpoint, save_safetensors
from hm3.merging.engine import merge, merge_state, output_specs, prepare
from hm3.testing import mapped_file


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5}),
                                           ("linear", {})])
def test_streamed_merge_equals_the_whole_state_writer(recipe, tmp_path, method, params):
    """``hm3.merge(out=...)`` streams; its file equals save_safetensors(merge_state) byte for byte and
    loads like safetensors.torch.save_file's output of the same state, with the same metadata."""
    rec = recipe(method, **params)
    res = merge(rec, tmp_path / "out", progress=False)
    streamed = (res.path / "model.safetensors").read_bytes()

    state = merge_state(prepare(rec), progress=False)
    save_safetensors(state, tmp_path / "whole.safetensors", {"format": "pt"})
    assert streamed == (tmp_path / "whole.safetensors").read_bytes()

    save_file(state, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    ours, ref = load_file(str(res.path / "model.safetensors")), load_file(str(tmp_path / "ref.safetensors"))
    assert list(ours) == list(state)  # the merge's own tensor order
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k
    with safe_open(str(res.path / "model.safetensors"), "pt") as a, safe_open(str(tmp_path / "ref.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata() == {"format": "pt"}


def test_output_specs_match_the_merged_tensors(recipe):
    """The header is computed before merging: names, dtypes and shapes must be what the merge makes."""
    rec = {**recipe("ties", density=0.5), "dtype": "bfloat16"}
    prep = prepare(rec)
    state = merge_state(prep, progress=False)
    assert output_specs(prep) == [(k, t.dtype, tuple(t.shape)) for k, t in state.items()]
    assert any(d == torch.bfloat16 for _, d, _ in output_specs(prep))


def test_writer_refuses_tensors_the_header_did_not_announce(tmp_path):
    specs = [("a", torch.float32, (2, 3)), ("b", torch.int64, (4,))]
    with pytest.raises(HM3Error, match="announced 'a'"):
        with SafetensorsWriter(tmp_path / "x.safetensors", specs) as w:
            w.write("b", torch.arange(4))
    with pytest.raises(HM3Error, match="announced 'a'"):
        with SafetensorsWriter(tmp_path / "x.safetensors", specs) as w:
            w.write("a", torch.zeros(3, 2))  # wrong shape
    with pytest.raises(HM3Error, match="only 1 of 2"):
        with SafetensorsWriter(tmp_path / "x.safetensors", specs) as w:
            w.write("a", torch.zeros(2, 3))
    with SafetensorsWriter(tmp_path / "x.safetensors", specs, {"k": "v"}) as w:
        w.write("a", torch.ones(2, 3))
        w.write("b", torch.arange(4))
    back = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(back["a"], torch.ones(2, 3)) and torch.equal(back["b"], torch.arange(4))


def test_checkpoint_reads_every_dtype_exactly(tmp_path):
    """pread-based tensor reads return what safetensors itself reads (floats as float32)."""
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10, "hidden_size": 4,
                                               "num_hidden_layers": 1, "num_attention_heads": 1,
                                               "intermediate_size": 8}))
    state = {"bert.w": torch.randn(3, 5), "bert.ids": torch.arange(7), "bert.bf": torch.randn(4).to(torch.bfloat16),
             "bert.h": torch.randn(2, 2).half(), "bert.empty": torch.zeros(0, 3), "bert.s": torch.tensor(2.5),
             "bert.flag": torch.tensor([True, False])}
    save_file(state, str(d / "model.safetensors"))
    ck = load_checkpoint(d)
    for k, v in state.items():
        got = ck.tensor(k)
        want = v.float() if v.is_floating_point() else v
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), k
        mapped = ck.tensor(k, mapped=True)  # a map of the bytes for float32, else read as above
        assert mapped.dtype == want.dtype and mapped.shape == want.shape and torch.equal(mapped, want), k
        if v.is_floating_point():  # read_into: straight into a float32 buffer, or converted (bf16, f16)
            out = torch.full(v.shape, 7.0)
            assert ck.read_into(k, out) is out and torch.equal(out, want), k
    ck.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
def test_mapped_tensor_is_copy_on_write_and_outlives_close(tmp_path):
    """A mapped tensor is the file's bytes without a copy; writing to it changes only this
    process's copy of the page, never the file, and it stays valid after the checkpoint closes."""
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    w = torch.randn(300, 70)  # spans pages, at an offset that is not page aligned
    save_file({"bert.a": torch.randn(5), "bert.w": w}, str(d / "model.safetensors"))
    raw = (d / "model.safetensors").read_bytes()
    ck = load_checkpoint(d)
    t = ck.tensor("bert.w", mapped=True)
    assert mapped_file(t) == str(d / "model.safetensors") and mapped_file(ck.tensor("bert.w")) is None
    ck.close()
    assert torch.equal(t, w)
    t.mul_(2)  # a write: copy on write
    assert torch.equal(t, 2 * w)
    assert (d / "model.safetensors").read_bytes() == raw
    assert torch.equal(load_checkpoint(d).tensor("bert.w", mapped=True), w)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
def test_mapped_read_falls_back_to_pread_where_files_cannot_be_mapped(tmp_path, monkeypatch):
    """Some file systems (FUSE mounts, some network shares) refuse mmap: the tensor is read instead."""
    import errno
    import mmap

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    w = torch.randn(40, 30)
    save_file({"bert.w": w}, str(d / "model.safetensors"))

    def refuse(*args, **kwargs):
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(mmap, "mmap", refuse)
    t = load_checkpoint(d).tensor("bert.w", mapped=True)
    assert torch.equal(t, w) and mapped_file(t) is None


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    save_file({"bert.w": torch.randn(64, 64)}, str(d / "model.safetensors"))
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:-100])
    for mapped in (False, True):
        with pytest.raises(HM3Error, match="model.safetensors"):
            load_checkpoint(d).tensor("bert.w", mapped=mapped)


def test_failed_streamed_merge_leaves_nothing(recipe, tmp_path):
    """An error halfway through the stream (here: lambda overflows to inf) leaves no output directory
    and no temporary one."""
    rec = recipe("task_arithmetic")
    rec["parameters"] = {"lambda": 1e39}
    with pytest.raises(HM3Error, match="NaN/inf"):
        merge(rec, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_read_into_refuses_nan(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    save_file({"bert.w": torch.tensor([1.0, float("nan")])}, str(d / "model.safetensors"))
    with pytest.raises(HM3Error, match="NaN or inf"):
        load_checkpoint(d).read_into("bert.w", torch.empty(2))
    with pytest.raises(HM3Error, match="NaN or inf"):
        load_checkpoint(d).tensor("bert.w", mapped=True)
