"""Loading and validating checkpoints; atomic saving of merged models.

Tensors are read lazily from safetensors files, one at a time, so a merge never holds more than
the tensors it is working on: with ``pread`` into a fresh tensor, or (``tensor(name, mapped=True)``,
the streaming merge's inputs) as a copy-on-write memory map of the tensor's own bytes, which costs no
copy and no fresh pages and is unmapped when the tensor is freed (never a map of the whole file,
whose touched pages would count towards the process's memory until the end). Merged models are
written tensor by tensor as they are produced (``SafetensorsWriter``). Pickle checkpoints
(``pytorch_model.bin``) are refused unless the caller passes ``allow_pickle=True`` — and even then
they go through ``torch.load(weights_only=True)``.

A plain merge never imports transformers (about 1-2 s of a merge process's start-up): config.json is
read as JSON (``ModelConfig``), a tokenizer's vocabulary from ``tokenizer.json`` / ``vocab.txt``
(``tokenizer_vocab``), and the merged model's tokenizer is a byte-for-byte copy of the source's
files (``copy_tokenizer``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import mmap
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hm3._lazy import torch
from hm3.errors import HM3Error
from hm3.heads import Family, family_of
from hm3.labels import labels_from_config

log = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
CONFIG = "config.json"
# A directory "ships a tokenizer" when it has one of these (the files a tokenizer's vocabulary lives in).
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spm.model", "sentencepiece.bpe.model")
# Everything a tokenizer directory may hold (transformers' slow and fast tokenizers of the supported
# families): what decides the vocabulary and what ``copy_tokenizer`` copies.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spm.model", "sentencepiece.bpe.model",
                   "spiece.model", "tokenizer.model", "bpe_encoder.bin", "chat_template.jinja")


#: what a hub snapshot downloads: config, safetensors (and their index), tokenizer files
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
#: ... plus, with ``allow_pickle``, the pickled checkpoints (a model published without safetensors)
HUB_PICKLE_PATTERNS = ["pytorch_model*.bin"]


def resolve(ref: str | os.PathLike, *, allow_pickle: bool = False) -> Path:
    """A local directory for ``ref``: the path itself, or a hub snapshot (needs network) of the files
    hm3 reads (``HUB_PATTERNS``; ``allow_pickle``: also ``HUB_PICKLE_PATTERNS``)."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HM3Error(f"{path}: expected a model directory (with config.json), found a file")
        return path
    text = str(ref)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise HM3Error(f"{text}: no such model directory")
    try:
        from huggingface_hub import snapshot_download

        patterns = HUB_PATTERNS + (HUB_PICKLE_PATTERNS if allow_pickle else [])
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # network, auth, unknown repo: all the user's to fix
        raise HM3Error(
            f"{text}: not a local directory and the hub download failed ({type(e).__name__}: {e}); "
            "pass a local model directory"
        ) from None


@dataclass
class Checkpoint:
    """One model on disk: its config, family and a lazy name → tensor table (canonical names)."""

    ref: str
    path: Path
    config: "ModelConfig"  # config.json as read (no transformers import)
    family: Family
    _where: dict[str, tuple[Path, str]] = field(repr=False)  # canonical name -> (file, stored key)
    _shapes: dict[str, tuple[int, ...]] = field(repr=False)
    _dtypes: dict[str, str] = field(repr=False)
    _pickled: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)  # open files (or safe_open handles)
    _spans: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)  # name -> file byte range

    # -- table -------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def is_float(self, name: str) -> bool:
        return self._dtypes[name] in ("F64", "F32", "F16", "BF16", "float64", "float32", "float16", "bfloat16")

    def dtype(self, name: str) -> torch.dtype:
        """The stored torch dtype of ``name`` (``tensor()`` returns floats as float32)."""
        code = self._dtypes[name]
        dt = _torch_dtypes().get(code) or getattr(torch, code, None)
        if not isinstance(dt, torch.dtype):
            raise HM3Error(f"{self._where[name][0]}: tensor {name!r} has dtype {code} that hm3 cannot read")
        return dt

    def code(self, name: str) -> str:
        """The safetensors dtype code of ``name`` as stored (``F32``, ``BF16``, ``I64``, ...; a pickled
        checkpoint's tensors give torch's names, e.g. ``float32``)."""
        return self._dtypes[name]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    @property
    def has_head(self) -> bool:
        return all(n in self._where for n in self.family.out)

    @property
    def num_outputs(self) -> int:
        return self._shapes[self.family.out[0]][0]

    def labels(self) -> list[str]:
        """Label names in row order (may be uninformative, e.g. LABEL_0)."""
        n = self.num_outputs
        return labels_from_config(getattr(self.config, "id2label", None), n)

    def tensor(self, name: str, *, mapped: bool = False) -> torch.Tensor:
        """Read one tensor (float32 for floats), checking it holds no NaN/inf.

        ``mapped``: a float32 tensor comes as a private (copy-on-write) memory map of its bytes in
        the file instead of a copy — writable, the file never changes, and the map goes when the
        tensor is freed. For short-lived inputs (the streaming merge's): while the map lives, the
        file must not be truncated in place (replacing it by a rename, as hm3 writes its models,
        is fine)."""
        file, key = self._where[name]
        if self._pickled is not None:
            t = self._pickled[key]
        elif self.readable(name):
            return torch.from_numpy(self.array(name, mapped=mapped))  # checked, floats as float32
        else:
            try:
                handle = self._handles.get(file)
                if handle is None:
                    from safetensors import safe_open

                    handle = self._handles[file] = safe_open(str(file), framework="pt")
                t = handle.get_tensor(key)
            except Exception as e:
                raise HM3Error(f"{file}: cannot read tensor {key!r} ({e}); the file is corrupt or truncated") from None
        if t.is_floating_point():
            if not all_finite(t):
                raise HM3Error(f"{file}: tensor {key!r} contains NaN or inf values; this checkpoint is broken")
            t = t.float()
        return t

    def readable(self, name: str) -> bool:
        """Whether ``name``'s bytes can be read straight from its safetensors file (``array``)."""
        return self._pickled is None and name in self._spans and sys.byteorder == "little"

    def array(self, name: str, *, mapped: bool = False, check: bool = True) -> np.ndarray:
        """``tensor()`` as a numpy array, without torch: floats as float32 (bfloat16 widened exactly),
        checked for NaN/inf (unless ``check`` is False: the caller checks what it computes from them,
        and calls ``check_finite`` to name the file); ``mapped`` as there. Only for ``readable``
        tensors."""
        if not self.readable(name):
            raise HM3Error(f"{self._where[name][0]}: tensor {name!r} cannot be read without torch")
        code, shape = self._dtypes[name], self._shapes[name]
        raw = self._bytes(name, mapped=mapped and code == "F32")
        if code == "BF16":  # the upper half of a float32
            a = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            a = raw.view(_NUMPY_DTYPES[code])
        a = a.reshape(shape)
        if a.dtype.kind == "f":
            if check:
                self.check_finite(name, a)
            a = a.astype(np.float32, copy=False)
        return a

    def check_finite(self, name: str, a: np.ndarray) -> None:
        """An error naming the file and the tensor if ``a`` (``name``'s values) holds NaN or inf."""
        if not array_finite(a):
            file, key = self._where[name]
            raise HM3Error(f"{file}: tensor {key!r} contains NaN or inf values; this checkpoint is broken")

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """``out.copy_(self.tensor(name))``, but a float32 tensor is read straight into ``out``'s
        memory (contiguous, same shape): no intermediate tensor, one pass less over the bytes."""
        file, key = self._where[name]
        if (self.readable(name) and self._dtypes[name] == "F32" and out.dtype == torch.float32
                and out.is_contiguous() and tuple(out.shape) == tuple(self._shapes[name])):
            self._bytes(name, into=out.view(-1).view(torch.uint8).numpy())
            if not all_finite(out):
                raise HM3Error(f"{file}: tensor {key!r} contains NaN or inf values; this checkpoint is broken")
            return out
        return out.copy_(self.tensor(name))

    def _span(self, name: str) -> tuple[int, int]:
        """``(start, stop)`` of a tensor's bytes in its file, checked against its shape and dtype."""
        file, key = self._where[name]
        code, shape = self._dtypes[name], self._shapes[name]
        if code not in _ITEMSIZE:
            raise HM3Error(f"{file}: tensor {name!r} has dtype {code} that hm3 cannot read")
        start, stop = self._spans[name]
        numel = math.prod(shape)
        if stop - start != numel * _ITEMSIZE[code]:
            raise HM3Error(f"{file}: tensor {key!r} spans {stop - start} bytes but its shape {list(shape)} "
                           f"needs {numel * _ITEMSIZE[code]}; the file is corrupt")
        return start, stop

    def _file(self, file: Path):
        fh = self._handles.get(file)
        if fh is None:
            fh = self._handles[file] = open(file, "rb", buffering=0)
        return fh

    def _bytes(self, name: str, *, mapped: bool = False, into: np.ndarray | None = None) -> np.ndarray:
        """A tensor's bytes (uint8; safetensors data is little-endian, as this machine): read into
        ``into`` or a fresh array, or (``mapped``) a copy-on-write map of them (``_map``)."""
        if mapped and into is None:
            m = self._map(name)
            if m is not None:
                return m
        return self._pread(name, into)

    def _map(self, name: str) -> np.ndarray | None:
        """One tensor's bytes as a copy-on-write map (``mmap.ACCESS_COPY``: pages are read from the
        page cache on first touch, a write copies the page into this process only). The array holds
        the map, which is closed when the array (and any tensor made from it) is freed; the map keeps
        its own descriptor, so ``close()`` does not end it. None where the file system cannot map
        files (the caller reads them instead)."""
        file, key = self._where[name]
        start, stop = self._span(name)
        if stop == start:
            return np.empty(0, np.uint8)
        lo = start - start % mmap.ALLOCATIONGRANULARITY  # maps start on a granularity boundary
        try:
            fh = self._file(file)
            size = os.fstat(fh.fileno()).st_size
        except OSError as e:
            raise HM3Error(f"{file}: cannot read tensor {key!r} ({e})") from None
        if size < stop:
            raise HM3Error(f"{file}: cannot read tensor {key!r} (file ends at byte {size}, before {stop}); "
                           "the file is corrupt or truncated")
        try:
            m = mmap.mmap(fh.fileno(), stop - lo, access=mmap.ACCESS_COPY, offset=lo)
        except (OSError, ValueError) as e:  # e.g. ENODEV: a file system without mmap
            log.debug("%s: cannot map tensor %r (%s); reading it instead", file, key, e)
            return None
        return np.frombuffer(m, dtype=np.uint8, count=stop - start, offset=start - lo)

    def _pread(self, name: str, into: np.ndarray | None = None) -> np.ndarray:
        """Read one tensor's bytes from the file into ``into`` or a fresh array. The page cache
        keeps the file; this process keeps only the array, freed when the caller drops it."""
        file, key = self._where[name]
        start, stop = self._span(name)
        buf = np.empty(stop - start, dtype=np.uint8) if into is None else into
        if buf.size != stop - start:
            raise ValueError(f"read_into: {name!r} needs {stop - start} bytes, the buffer has {buf.size}")
        view = memoryview(buf)
        try:
            fh = self._file(file)
            got = 0
            while got < len(view):
                n = os.preadv(fh.fileno(), [view[got:]], start + got)
                if n <= 0:
                    raise OSError(f"file ends at byte {start + got}")
                got += n
        except OSError as e:
            raise HM3Error(f"{file}: cannot read tensor {key!r} ({e}); the file is corrupt or truncated") from None
        return buf

    def close(self) -> None:
        for h in self._handles.values():
            if hasattr(h, "close"):
                h.close()
        self._handles.clear()


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/inf in ``t``. A finite sum proves it in one reduction (any NaN/inf makes the sum
    non-finite), without the full boolean copy ``isfinite`` makes; only a non-finite sum (which
    finite values can also overflow to) needs the exact elementwise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def array_finite(a: np.ndarray) -> bool:
    """``all_finite`` for a numpy array (the same two steps)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(a.sum())) or bool(np.isfinite(a).all())


#: bytes per element of each safetensors dtype code hm3 reads
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
#: numpy's dtype for each code (bfloat16, which numpy lacks, is widened by ``Checkpoint.array``)
_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                 "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors_table(file: Path) -> dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]:
    """key -> (dtype, shape, (first byte, end byte) in the file) from a safetensors header,
    validating the file's size."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > 100_000_000 or 8 + n > size:
                raise ValueError("header length is out of range")
            header = json.loads(fh.read(n))
        end = 0
        table = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            start, stop = info["data_offsets"]
            if not 0 <= start <= stop:
                raise ValueError(f"tensor {key!r} has data offsets {start}..{stop}")
            end = max(end, stop)
            table[key] = (info["dtype"], tuple(info["shape"]), (8 + n + start, 8 + n + stop))
        if 8 + n + end > size:
            raise ValueError(f"data ends at byte {8 + n + end} but the file has {size} bytes")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HM3Error(f"{file}: not a valid safetensors file ({e}); re-save or re-download it") from None
    return table


def _canonical(key: str, family: Family) -> str:
    """Body tensors under ``<prefix>.``; headless encoders (e.g. a plain BertModel) lack the prefix."""
    if key.startswith(family.prefix + ".") or family.is_head(key):
        return key
    return f"{family.prefix}.{key}"


class ModelConfig:
    """A model's config.json as read from disk: its keys as attributes (``cfg.model_type``,
    ``getattr(cfg, "vocab_size", None)``), ``id2label`` with int keys as transformers gives them.

    Read as JSON instead of through ``transformers.AutoConfig``, whose import alone costs a merge
    process 1-2 s. A missing key is an AttributeError (transformers would fill in its class default:
    hm3 reads only keys a checkpoint's config.json of a supported family has). ``to_dict`` returns
    the file's content, for the merged model's config.json.
    """

    def __init__(self, data: dict, file: Path):
        self._data = data
        self.file = file

    def __getattr__(self, key: str):
        if key.startswith("_"):  # internals (and copy/pickle probing) never come from the file
            raise AttributeError(key)
        try:
            value = self._data[key]
        except KeyError:
            raise AttributeError(f"{self.file} has no key {key!r}") from None
        if key == "id2label" and isinstance(value, dict):
            return {int(k): v for k, v in value.items()}  # checked in read_config
        return value

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def to_dict(self) -> dict:
        """A deep copy of the file's content (JSON types: ``id2label`` keys are strings)."""
        return json.loads(json.dumps(self._data))

    def __repr__(self) -> str:
        return f"ModelConfig({self.file}, model_type={self._data.get('model_type')!r})"


def read_config(path: Path) -> ModelConfig:
    """``path/config.json`` as a ``ModelConfig``, checked for what hm3 relies on: a JSON object with a
    ``model_type`` and, when present, an ``id2label`` that maps label ids to names. (Whether hm3
    supports the ``model_type`` is ``hm3.heads.family_of``'s question.)"""
    file = path / CONFIG
    if not file.is_file():
        raise HM3Error(f"{path}: no {CONFIG}; expected a Hugging Face model directory")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HM3Error(f"{file}: cannot read the model config ({e}); restore the file the model was saved with") from None
    if not isinstance(data, dict):
        raise HM3Error(f"{file}: expected a JSON object, found {type(data).__name__}; restore the file the model "
                       "was saved with")
    if not isinstance(data.get("model_type"), str):
        raise HM3Error(f'{file}: no "model_type" (e.g. "bert"); add it, or re-save the model with transformers')
    id2label = data.get("id2label")
    if id2label is not None:
        try:
            if not isinstance(id2label, dict):
                raise ValueError("not an object")
            for k in id2label:
                int(k)
        except ValueError:
            raise HM3Error(f'{file}: "id2label" must map label ids ("0", "1", ...) to names; fix or remove it') from None
    return ModelConfig(data, file)


def load_checkpoint(ref: str | os.PathLike, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a model directory: config, family and tensor table. Tensors are read on demand."""
    path = resolve(ref, allow_pickle=allow_pickle)
    config = read_config(path)
    family = family_of(config.model_type, str(path / CONFIG))

    where: dict[str, tuple[Path, str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    spans: dict[str, tuple[int, int]] = {}
    pickled = None
    files: list[Path]
    if (path / SAFETENSORS_INDEX).is_file():
        try:
            index = json.loads((path / SAFETENSORS_INDEX).read_text())
            files = sorted({path / f for f in index["weight_map"].values()})
        except (ValueError, KeyError) as e:
            raise HM3Error(f"{path / SAFETENSORS_INDEX}: malformed shard index ({e})") from None
    elif (path / SAFETENSORS).is_file():
        files = [path / SAFETENSORS]
    elif (path / PICKLE).is_file():
        if not allow_pickle:
            raise HM3Error(
                f"{path}: only a pickle checkpoint ({PICKLE}) is present; pickles can run code when loaded. "
                "Convert it to safetensors, or pass --allow-pickle if you trust its source"
            )
        try:
            pickled = torch.load(path / PICKLE, map_location="cpu", weights_only=True)
        except Exception as e:
            raise HM3Error(f"{path / PICKLE}: cannot load ({e})") from None
        for key, t in pickled.items():
            name = _canonical(key, family)
            where[name] = (path / PICKLE, key)
            shapes[name] = tuple(t.shape)
            dtypes[name] = str(t.dtype).removeprefix("torch.")
        files = []
    else:
        raise HM3Error(f"{path}: no weights found (expected {SAFETENSORS})")

    for file in files:
        if not file.is_file():
            raise HM3Error(f"{file}: shard listed in the index is missing")
        for key, (dtype, shape, span) in _read_safetensors_table(file).items():
            name = _canonical(key, family)
            where[name] = (file, key)
            shapes[name] = shape
            dtypes[name] = dtype
            spans[name] = span
    return Checkpoint(str(ref), path, config, family, where, shapes, dtypes, pickled, _spans=spans)


def has_tokenizer(path: Path) -> bool:
    """Whether the directory ships a tokenizer (one of ``TOKENIZER_VOCAB_FILES``)."""
    return any((path / f).is_file() for f in TOKENIZER_VOCAB_FILES)


def tokenizer_vocab(path: Path) -> dict[str, int] | None:
    """The tokenizer's vocabulary (token -> id, added tokens included), or None when the directory
    ships no tokenizer.

    Read from the files as transformers would: ``tokenizer.json`` (what a fast tokenizer loads),
    else ``vocab.txt`` (one token a line) or ``vocab.json``, plus the added tokens of
    ``added_tokens.json`` and ``tokenizer_config.json``. Only a tokenizer with none of those files
    (a bare sentencepiece model) is loaded through transformers."""
    if not has_tokenizer(path):
        return None
    try:
        if (path / "tokenizer.json").is_file():
            vocab = _tokenizer_json_vocab(path / "tokenizer.json")
        elif (path / "vocab.txt").is_file():
            vocab = {}
            with open(path / "vocab.txt", encoding="utf-8") as fh:  # as transformers' load_vocab reads it
                for i, line in enumerate(fh):
                    vocab[line.rstrip("\n")] = i
        elif (path / "vocab.json").is_file():
            vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
            if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
                raise ValueError("vocab.json is not an object of token ids")
        else:
            vocab = None
        if vocab is not None:
            return {**vocab, **_added_tokens(path)}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise HM3Error(f"{path}: cannot read the tokenizer's vocabulary ({type(e).__name__}: {e}); "
                       "re-save the tokenizer with transformers") from None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path)).get_vocab()
    except Exception as e:
        raise HM3Error(f"{path}: cannot load the tokenizer ({e})") from None


def _tokenizer_json_vocab(file: Path) -> dict[str, int]:
    """token -> id of a ``tokenizers`` file: the model's vocabulary and the added tokens."""
    data = json.loads(file.read_text(encoding="utf-8"))
    model = data["model"]
    raw = model["vocab"]
    if isinstance(raw, dict):  # WordPiece, WordLevel, BPE
        vocab = {str(t): int(i) for t, i in raw.items()}
    elif isinstance(raw, list):  # Unigram: [[piece, score], ...], ids in order
        vocab = {str(piece[0]): i for i, piece in enumerate(raw)}
    else:
        raise ValueError(f"{file.name}: model {model.get('type')!r} has no vocabulary hm3 can read")
    for tok in data.get("added_tokens") or []:
        vocab[str(tok["content"])] = int(tok["id"])
    return vocab


def _added_tokens(path: Path) -> dict[str, int]:
    """Added tokens listed beside the vocabulary (``added_tokens.json``, ``tokenizer_config.json``)."""
    added: dict[str, int] = {}
    if (path / "added_tokens.json").is_file():
        added.update({str(t): int(i) for t, i in json.loads((path / "added_tokens.json").read_text(encoding="utf-8")).items()})
    if (path / "tokenizer_config.json").is_file():
        decoder = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("added_tokens_decoder")
        for i, tok in (decoder or {}).items():
            added[str(tok["content"] if isinstance(tok, dict) else tok)] = int(i)
    return added


def copy_tokenizer(src: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer files of ``src`` (``TOKENIZER_FILES``) into ``out_dir`` byte for byte.

    The copy loads as the source does (``AutoTokenizer.from_pretrained``), without importing
    transformers, and with none of the keys a re-save adds. Returns the names copied; an error
    when ``src`` ships no tokenizer."""
    src = Path(src)
    if not has_tokenizer(src):
        raise HM3Error(f"{src}: no tokenizer to copy (none of {', '.join(TOKENIZER_VOCAB_FILES)}); "
                       "set `tokenizer_source` to a model with one")
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    try:
        for n in names:
            shutil.copyfile(src / n, out_dir / n)
    except OSError as e:
        raise HM3Error(f"{src}: cannot copy the tokenizer ({e})") from None
    return names


# -- saving ------------------------------------------------------------------------------------------
def prepare_output(out: str | os.PathLike, force: bool) -> Path:
    """Check that ``out`` may be written; nothing is touched yet. With ``force`` an existing directory
    is replaced as a whole, so only one that holds what hm3 writes there (``replaceable``)."""
    out = Path(out)
    if out.exists() and not force:
        raise HM3Error(f"{out}: already exists; choose another output directory or pass --force")
    if out.exists() and not out.is_dir():
        raise HM3Error(f"{out}: exists and is not a directory")
    if out.exists():
        other = replaceable(out)
        if other is not None:
            raise HM3Error(f"{out}: holds {other}, which is not a model; --force replaces a directory as a "
                           "whole, so only an empty one or a model directory (config.json) hm3 wrote or could "
                           "have written; choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def replaceable(d: Path) -> str | None:
    """None if ``--force`` may replace directory ``d`` with a model: it is empty, a model directory
    (``config.json``), or ``hm3 expand``'s output (the models it expanded and their mergekit recipe);
    else an entry that is none of these. A directory of other files — a home, a project, a folder of
    one's models, a zoo — is never deleted for a mistyped ``-o``."""
    if (d / "config.json").is_file():
        return None
    for e in sorted(d.iterdir()):
        if not (_expanded_model(e) if e.is_dir() else e.name == "mergekit.yml"):
            return repr(e.name)
    return None


def _expanded_model(d: Path) -> bool:
    """Whether ``d`` is a model ``hm3 expand`` wrote (its config.json says so under ``hm3.expanded``)."""
    try:
        return "expanded" in json.loads((d / "config.json").read_text(encoding="utf-8")).get("hm3", {})
    except (OSError, ValueError, AttributeError):
        return False


class AtomicDir:
    """Write into a temporary sibling directory; move it into place only when everything succeeded.

    On error the temporary directory is removed and an existing ``out`` is left untouched.
    """

    def __init__(self, out: Path, force: bool = False):
        self.out = prepare_output(out, force)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_output_file(path: str | os.PathLike) -> Path:
    """An error now, before any work, if ``path`` cannot become a file: a folder is there."""
    path = Path(path)
    if path.is_dir():
        raise HM3Error(f"{path}: is a folder; give the output file's name (e.g. {path / 'out.jsonl'})")
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file via a temporary sibling and a rename: readers never see half a file."""
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_text_rows(path: str | os.PathLike, *, labelled: bool = False,
                   why: str = "a labelled re-fit", field: str = "label") -> list[tuple[str, Any]]:
    """``(text, label)`` rows from ``.jsonl`` (fields ``text`` and, when ``labelled``, ``label``),
    ``.csv`` / ``.tsv`` (a header row naming the columns ``text`` and, when ``labelled``, ``label``;
    labels as strings) or ``.txt`` (one text a line, no labels). ``why``: what needs the labels, for
    the error message. ``field``: the row's field read as its label (e.g. ``source`` for
    ``hm3 agree --by source``)."""
    path = Path(path)
    if not path.is_file():
        raise HM3Error(f"{path}: no such text file")
    rows: list[tuple[str, Any]] = []
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise HM3Error(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if path.suffix == ".jsonl":
        # split on "\n" only: JSON strings may hold U+2028 and other characters splitlines() breaks on
        for i, line in enumerate(raw.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise HM3Error(f"{path}:{i}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise HM3Error(f'{path}:{i}: expected an object with a string field "text"')
            if labelled and not isinstance(row.get(field), (str, int, list)):
                raise HM3Error(f'{path}:{i}: {why} needs a field "{field}" (a string or an integer; for a '
                               "multi-label group, a list of them)")
            rows.append((row["text"], row.get(field)))
    elif path.suffix in (".csv", ".tsv"):
        rows = _table_rows(path, raw, labelled, why, field)
    elif path.suffix in (".txt", ""):
        if labelled:
            raise HM3Error(f"{path}: {why} needs .jsonl rows {{\"text\", \"{field}\"}} (or a .csv / .tsv with "
                           f"columns text and {field}); .txt holds only texts")
        rows = [(line.rstrip("\r"), None) for line in raw.split("\n") if line.strip()]
    else:
        raise HM3Error(f"{path}: unsupported text file type {path.suffix!r}; use .jsonl (field text), .csv / .tsv "
                       "(column text) or .txt")
    if not rows:
        raise HM3Error(f"{path}: the file has no texts")
    return rows


def _table_rows(path: Path, raw: str, labelled: bool, why: str, field: str) -> list[tuple[str, Any]]:
    """``read_text_rows`` of a ``.csv`` / ``.tsv`` file: the columns ``text`` and ``field`` by name."""
    import csv
    import io as _io

    reader = csv.DictReader(_io.StringIO(raw, newline=""), delimiter="\t" if path.suffix == ".tsv" else ",")
    columns = [c for c in reader.fieldnames or [] if c is not None]
    wanted = ["text"] + ([field] if labelled else [])
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise HM3Error(f"{path}: the header row needs the column{'s' if len(missing) > 1 else ''} "
                       f"{', '.join(missing)}" + (f" ({why})" if labelled and field in missing else "")
                       + f"; it has {', '.join(columns) or 'none'}")
    rows: list[tuple[str, Any]] = []
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            text, label = row.get("text"), row.get(field)
            if text is None or (labelled and label is None):
                raise HM3Error(f"{where}: the row has fewer fields than the header")
            if not text.strip():
                continue
            if labelled and not label.strip():
                raise HM3Error(f"{where}: {why} needs a {field} in every row; this one is empty")
            rows.append((text, label.strip() if labelled else label))
    except csv.Error as e:
        raise HM3Error(f"{path}:{reader.line_num}: malformed {path.suffix[1:].upper()} ({e})") from None
    return rows


def recipe_models(model_dir: str | os.PathLike) -> list[dict] | None:
    """The recipe's model entries (``{"model", "group", ...}``) that a merged model's ``config.json``
    records under ``hm3.recipe``; None when the file, the recipe or an entry's ``model`` is missing."""
    try:
        models = json.loads((Path(model_dir) / "config.json").read_text())["hm3"]["recipe"]["models"]
        if all(isinstance(m["model"], str) for m in models):
            return list(models)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def group_pairs(values: Sequence[str] | None, option: str, value: str = "PATH", example: str = "") -> dict[str, str]:
    """Command-line ``GROUP=VALUE`` items (``--data``, ``--guard``, ...) as ``{group: value}``, whitespace
    around either side dropped. A missing side, or a group given twice, is an error naming ``option``."""
    out: dict[str, str] = {}
    for item in values or []:
        group, sep, rest = item.partition("=")
        group, rest = group.strip(), rest.strip()
        if not sep or not group or not rest:
            hint = f", e.g. {option} {example}" if example else ""
            raise HM3Error(f"{option} {item!r}: expected GROUP={value}{hint}")
        if group in out:
            raise HM3Error(f"{option}: group {group!r} given twice")
        out[group] = rest
    return out


def texts_from(input: str | os.PathLike | None, text: Sequence[str] | None = None) -> list[str]:
    """The texts a command was given: ``--text`` values, or ``--input`` — a .txt file (one text a line),
    a .jsonl file (field ``text``), a .csv / .tsv file (column ``text``), or ``-`` for one text a line on
    stdin. Exactly one of the two."""
    if (input is None) == (not text):
        raise HM3Error("give the texts with --input FILE (or - for stdin) or with --text, not both" if text
                       else "no texts: pass --input FILE (.txt, .jsonl, .csv, .tsv, or - for stdin) or --text TEXT")
    if text:
        return list(text)
    if str(input) == "-":
        texts = [line.rstrip("\r") for line in sys.stdin.read().split("\n") if line.strip()]
        if not texts:
            raise HM3Error("stdin (--input -): no texts; pipe one text a line")
        return texts
    return [t for t, _ in read_text_rows(input)]


@functools.cache
def _torch_dtypes() -> dict:
    """safetensors dtype code -> torch dtype (imports torch)."""
    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}


def dtype_code(dtype) -> str | None:
    """The safetensors code of a torch or numpy dtype, or of a code itself; None if it has none."""
    if isinstance(dtype, str):
        return dtype if dtype in _ITEMSIZE else None
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        dt = np.dtype(dtype)
        return next((c for c, d in _NUMPY_DTYPES.items() if np.dtype(d) == dt), None)
    return next((c for c, d in _torch_dtypes().items() if d == dtype), None)


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, as the tensors are produced.

    The format is an 8-byte little-endian header length, a JSON header with each tensor's dtype,
    shape and data offsets, then the raw bytes in header order. The header depends only on names,
    dtypes and shapes, so it is written first from ``specs``; each ``write`` then appends one
    tensor's bytes straight from its memory. A merge thus never holds the merged model, and the
    file is byte-identical to ``save_safetensors`` of the same state dict. Tensors must come in
    ``specs`` order with the announced dtype and shape; ``close`` checks that all came.
    """

    def __init__(self, file: str | os.PathLike, specs: "list[tuple[str, Any, tuple[int, ...]]]",
                 metadata: dict[str, str] | None = None):
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._specs = []
        for name, dtype, shape in specs:  # dtype: a torch dtype, or a safetensors code ("F32")
            code = dtype_code(dtype)
            if code is None:
                raise HM3Error(f"cannot save tensor {name!r}: dtype {dtype} has no safetensors code")
            size = math.prod(int(d) for d in shape) * _ITEMSIZE[code]
            header[name] = {"dtype": code, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + size]}
            self._specs.append((name, dtype, code, tuple(int(d) for d in shape)))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.file = Path(file)
        self._fh = open(self.file, "wb")
        self._fh.write(len(raw).to_bytes(8, "little"))
        self._fh.write(raw)
        self._next = 0

    def write(self, name: str, t: "torch.Tensor | np.ndarray") -> None:
        """Append the next tensor's bytes: a torch tensor, or a numpy array (for a bfloat16 entry, its
        raw 16 bits as uint16)."""
        if self._next >= len(self._specs):
            raise HM3Error(f"{self.file}: tensor {name!r} was not announced in the header")
        want, dtype, code, shape = self._specs[self._next]
        if isinstance(t, np.ndarray):
            got = "BF16" if code == "BF16" and t.dtype == np.uint16 else dtype_code(t.dtype)
            data = np.ascontiguousarray(t)
        else:
            got = dtype_code(t.dtype)
            data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if name != want or got != code or tuple(t.shape) != shape:
            raise HM3Error(f"{self.file}: got tensor {name!r} {t.dtype} {tuple(t.shape)} where the header "
                           f"announced {want!r} {dtype} {shape}")
        if data.size:
            self._fh.write(memoryview(data.reshape(-1).view(np.uint8)))
        self._next += 1

    def close(self) -> None:
        """Finish the file; an error if announced tensors were never written."""
        if self._fh.closed:
            return
        self._fh.close()
        if self._next != len(self._specs):
            raise HM3Error(f"{self.file}: only {self._next} of {len(self._specs)} tensors were written")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()  # the caller's AtomicDir removes the partial file


def save_safetensors(state: dict[str, torch.Tensor], file: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write ``state`` as a safetensors file, streaming each tensor's bytes from its own memory.

    ``safetensors.torch.save_file`` first copies every tensor into a Python ``bytes`` object, so
    writing a model briefly needs twice its size; this writes the same format without the copy.
    """
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in state.items()]
    with SafetensorsWriter(file, specs, metadata) as w:
        for name, t in state.items():
            w.write(name, t)
