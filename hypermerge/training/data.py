"""Built-in data sets, made from package files by real code (nothing comes from a hub).

* ``sentiment``: the movie-review sentences with human ratings (-4..4) that ship in the source
  distribution of ``vaderSentiment==3.3.2`` (the rotten-tomatoes sentences SST-2 was built from).
  Sentences with |rating| <= 0.5 are dropped (neutral), the rest labelled positive / negative and
  split with a fixed seed into 8,000 train / 1,000 validation / the rest test (~1,043).
* ``arithmetic``: generated questions such as "What is 47 plus 385?" -> "432", seeded, with the
  test split drawn from operand pairs never seen in training.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from hypermerge.errors import HypermergeError

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
CORPORA = {
    "movie": "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "amazon": "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
    "tweets": "hutto_ICWSM_2014/tweets_GroundTruth.txt",
    "nyt": "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt",
}
SENTIMENT_LABELS = ("negative", "positive")
SPLIT_SEED = 20141001
TRAIN_SIZE, VALIDATION_SIZE = 8000, 1000


class DataError(HypermergeError):
    """A built-in data set could not be obtained or is damaged."""


@dataclasses.dataclass(frozen=True)
class Example:
    text: str
    label: int | str  # class index for classification, the answer text for generation


def cache_dir() -> Path:
    """Where downloaded and parsed data live: $HYPERMERGE_CACHE or ~/.cache/hypermerge."""
    root = os.environ.get("HYPERMERGE_CACHE") or Path.home() / ".cache" / "hypermerge"
    return Path(root) / "data"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def vader_sdist() -> Path:
    """The vaderSentiment source distribution, downloaded once through pip and checked by hash.

    Raises:
        DataError: pip could not download it, or what it downloaded has the wrong hash
            (an interrupted or tampered download; it is deleted so the next run retries).
    """
    target = cache_dir() / VADER_SDIST
    if target.exists():
        if _sha256(target) == VADER_SHA256:
            return target
        target.unlink()  # interrupted or damaged earlier download: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   "--dest", tmp, "vaderSentiment==3.3.2"]
        done = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(tmp) / VADER_SDIST
        if done.returncode != 0 or not downloaded.exists():
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"could not download vaderSentiment==3.3.2 for the sentiment data ({reason})",
                            path=target, hint=f"check access to PyPI, or place {VADER_SDIST} there by hand")
        if _sha256(downloaded) != VADER_SHA256:
            raise DataError("the downloaded vaderSentiment sdist has the wrong SHA-256", path=downloaded,
                            hint="the download was damaged; run again")
        os.replace(downloaded, target)
    return target


def read_rated_sentences(corpus: str = "movie") -> list[tuple[float, str]]:
    """``(mean rating, sentence)`` pairs of one corpus of the VADER ground-truth archive."""
    archive = vader_sdist()
    try:
        with tarfile.open(archive) as outer:
            inner_bytes = outer.extractfile(INNER_ARCHIVE).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            text = inner.extractfile(CORPORA[corpus]).read().decode("utf-8", errors="replace")
    except (tarfile.TarError, OSError, AttributeError, KeyError) as exc:
        archive.unlink(missing_ok=True)
        raise DataError(f"the vaderSentiment archive is damaged ({exc})", path=archive,
                        hint="it has been deleted; run again to download it afresh") from exc
    pairs = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            try:
                pairs.append((float(parts[1]), "\t".join(parts[2:]).strip()))
            except ValueError:
                continue
    return pairs


def sentiment_splits() -> dict[str, list[Example]]:
    """The binary sentiment set: ``{"train", "validation", "test"}`` -> examples (label 1 = positive).

    Parsed once and cached as JSON beside the archive.
    """
    cached = cache_dir() / "sentiment-v1.json"
    if cached.exists():
        try:
            raw = json.loads(cached.read_text())
            return {split: [Example(text, label) for text, label in rows] for split, rows in raw.items()}
        except (ValueError, TypeError):
            cached.unlink()
    examples = [(text, int(rating > 0)) for rating, text in read_rated_sentences("movie") if abs(rating) > 0.5]
    random.Random(SPLIT_SEED).shuffle(examples)
    splits = {
        "train": examples[:TRAIN_SIZE],
        "validation": examples[TRAIN_SIZE:TRAIN_SIZE + VALIDATION_SIZE],
        "test": examples[TRAIN_SIZE + VALIDATION_SIZE:],
    }
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(splits))
    os.replace(tmp, cached)
    return {split: [Example(text, label) for text, label in rows] for split, rows in splits.items()}


ARITHMETIC_OPERATIONS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}


def arithmetic_splits(train_size: int = 4000, validation_size: int = 500, test_size: int = 500,
                      max_operand: int = 999, seed: int = 0) -> dict[str, list[Example]]:
    """Generated arithmetic questions; no operand pair appears in two splits.

    ``Example.text`` is the prompt ("What is 47 plus 385? Answer:"), ``Example.label`` the answer
    with a leading space (" 432"), so prompt + label is the training text.
    """
    rng = random.Random(seed)
    seen: set[tuple[int, int, str]] = set()
    splits: dict[str, list[Example]] = {}
    for split, size in (("train", train_size), ("validation", validation_size), ("test", test_size)):
        rows = []
        while len(rows) < size:
            a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
            operation = rng.choice(["plus", "minus"] if max_operand > 99 else list(ARITHMETIC_OPERATIONS))
            key = (a, b, operation)
            if key in seen:
                continue
            seen.add(key)
            answer = ARITHMETIC_OPERATIONS[operation](a, b)
            rows.append(Example(f"What is {a} {operation} {b}? Answer:", f" {answer}"))
        splits[split] = rows
    return splits


# name -> (builder returning {"train", "validation", ...} -> examples, the task it is for)
BUILTIN = {
    "sentiment": (sentiment_splits, "sequence-classification"),
    "arithmetic": (arithmetic_splits, "causal-lm"),
}
# Class names of the built-in classification sets (written into the model's config as id2label).
BUILTIN_LABELS = {"sentiment": SENTIMENT_LABELS}


def read_examples(path: str | Path, text_field: str, label_field: str | None) -> list[dict[str, object]]:
    """Rows of a local ``.jsonl`` (one JSON object a line) or ``.csv`` (with a header) file, as
    dicts holding ``text_field`` and, where present, ``label_field``.

    Raises:
        DataError: the file is missing or unreadable, a line is not JSON, or a row lacks ``text_field``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("data file not found", path=path, hint="check data.train / data.validation in the recipe")
    rows: list[dict[str, object]] = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            if path.suffix == ".csv":
                rows = list(csv.DictReader(handle))
            else:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as exc:
                        raise DataError(f"line {number} is not JSON ({exc})", path=path,
                                        hint="a .jsonl file holds one JSON object per line") from None
                    if not isinstance(row, dict):
                        raise DataError(f"line {number} is not a JSON object", path=path,
                                        hint="a .jsonl file holds one JSON object per line")
                    rows.append(row)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the data file ({exc})", path=path) from exc
    if not rows:
        raise DataError("the data file holds no examples", path=path)
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get(text_field), str):
            fields = ", ".join(map(str, row)) or "none"
            raise DataError(f"example {number} has no text field {text_field!r} (its fields: {fields})",
                            path=path, hint="set data.text_field in the recipe")
    return rows
