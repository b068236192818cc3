"""Character lists: the shipped table of 《通用规范汉字表》, HammerLLM's charsets json, plain lists."""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from hammer.documents import read_text, split_lines
from hammer.errors import HammerError

# 《通用规范汉字表》 (2013): 3500 level-1 (common), 3000 level-2 and 1605 level-3 characters.
TGH_LEVEL_SIZES = (3500, 3000, 1605)
TGH_SET_NAMES = ("FCC", "SCC", "TCC")  # first-, second-, third-level character coverage
TGH_TABLE = "tgh_chars.tsv"


class CharsetError(HammerError):
    """A character list that cannot be read or holds entries that are not single characters."""


def tgh_levels(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """The three levels of 《通用规范汉字表》 in table order, from the shipped table or `path`."""
    if path is None:
        text = resources.files("hammer").joinpath("assets", TGH_TABLE).read_text(encoding="utf-8")
        where = f"hammer/assets/{TGH_TABLE}"
    else:
        text, where = read_text(Path(path)), str(path)
    levels: dict[str, list[str]] = {name: [] for name in TGH_SET_NAMES}
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    for number, line in enumerate(lines[1:], start=2):  # lines[0] is the header
        char, _, level = line.partition("\t")
        if len(char) != 1 or level not in ("1", "2", "3"):
            raise CharsetError(f"{where}: row {number} {line!r} is not 'character<TAB>level 1-3'")
        levels[TGH_SET_NAMES[int(level) - 1]].append(char)
    return levels


def read_charsets(path: str | os.PathLike) -> dict[str, list[str]]:
    """Named character lists from `path`.

    `.json`: HammerLLM's charsets_char.json layout, `{name: {"texts": [char, ...]}}`.
    `.tsv`: a table like the shipped one (character, level), giving FCC / SCC / TCC.
    Anything else: one character a line, named after the file.
    """
    path = Path(path)
    if path.suffix == ".tsv":
        return tgh_levels(path)
    if path.suffix == ".json":
        try:
            data = json.loads(read_text(path))
            sets = {name: list(entry["texts"]) for name, entry in data.items()}
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
            raise CharsetError(f"{path} is not a charsets json ({{name: {{\"texts\": [...]}}}}): {e}") from None
    else:
        sets = {path.stem: read_lines(path)}
    for name, chars in sets.items():
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise CharsetError(f"{path}: set {name!r} has {len(bad)} entries that are not single characters, "
                               f"e.g. {bad[0]!r}")
    return sets


def read_lines(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a UTF-8 text file (a user-defined symbol file); a symbol may be a space."""
    return [line for line in split_lines(read_text(Path(path))) if line]
