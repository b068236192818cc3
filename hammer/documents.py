"""Documents of a small text corpus file, read whole: what `hammer eval` scores and what the tokenizer
tools train on and measure. (`hammer data prepare` streams far larger inputs through `hammer.data`.)"""
from __future__ import annotations

import json
import os
from pathlib import Path

from hammer.errors import HammerError


class DocumentError(HammerError):
    """A corpus file that is not UTF-8, not JSON lines with a "text" field, or holds no documents."""


def read_documents(path: str | os.PathLike) -> list[str]:
    """The documents of a UTF-8 file: each non-blank line of a .txt (without its line end), or the
    string field "text" of each JSON object of a .jsonl; at least one."""
    path = Path(path)
    lines = split_lines(read_text(path, what="corpus file"))
    if path.suffix != ".jsonl":
        docs = [line for line in lines if line.strip()]
    else:
        docs = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DocumentError(f"{path}:{number} is not JSON: {e}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DocumentError(f"{path}:{number} has no string field 'text'")
            docs.append(record["text"])
    if not docs:
        raise DocumentError(f"corpus file {path} holds no documents")
    return docs


def read_text(path: Path, what: str = "file") -> str:
    """The text of a UTF-8 file; a missing or undecodable file is named in the error."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{what} {path} is not UTF-8 text: {e}") from None


def split_lines(text: str) -> list[str]:
    """The lines of `text`, split on line ends only ("\\n" or "\\r\\n"), as `hammer data prepare` splits a
    .txt: str.splitlines() would also split at U+2028, U+0085 or a form feed, which a document or a
    symbol may hold and which json.dumps(ensure_ascii=False) writes raw inside a .jsonl string."""
    return [line.removesuffix("\r") for line in text.split("\n")]
