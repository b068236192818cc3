import json
import subprocess
import sys

import pytest

from hammer.tokenizer.charsets import CharsetError, read_charsets, read_lines, tgh_levels
from tests.conftest import REPO


def test_shipped_table_is_the_three_levels_of_hammerllms_charsets_in_order(hammerllm_dir):
    reference = json.loads((hammerllm_dir / "charsets" / "charsets_char.json").read_text(encoding="utf-8"))
    first_three = [entry["texts"] for entry in list(reference.values())[:3]]
    levels = tgh_levels()
    assert list(levels) == ["FCC", "SCC", "TCC"]
    assert [len(chars) for chars in levels.values()] == [3500, 3000, 1605]
    assert list(levels.values()) == first_three


def test_shipped_table_carries_the_unicode_license_notice():
    text = (REPO / "hammer" / "assets" / "tgh_chars.tsv").read_text(encoding="utf-8")
    assert "kTGH" in text and "Unicode, Inc." in text and "SPDX-License-Identifier: Unicode-3.0" in text
    assert "Permission is hereby granted, free of charge" in text


def test_generator_rebuilds_the_table_from_unihan_text(tmp_path):
    numbered = {n: chr(0x4E00 + n) for n in range(1, 8106)}
    lines = ["# Date: 2021-08-06", "# Unicode version: 14.0.0"]
    lines += [f"U+{ord(c):04X}\tkTGH\t2013:{n:04d}" for n, c in sorted(numbered.items(), reverse=True)]
    lines += ["U+4E00\tkGB0\t5027"]
    (tmp_path / "Unihan_OtherMappings.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_charset_table.py"),
                    str(tmp_path / "Unihan_OtherMappings.txt"), "--output", str(tmp_path / "t.tsv")],
                   check=True, capture_output=True)
    levels = tgh_levels(tmp_path / "t.tsv")
    assert levels["FCC"][:2] == [numbered[1], numbered[2]] and levels["SCC"][0] == numbered[3501]
    assert levels["TCC"][-1] == numbered[8105] and len(levels["TCC"]) == 1605


def test_character_lists_refuse_entries_that_are_not_single_characters(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"set": {"texts": ["天", "天地"]}}), encoding="utf-8")
    with pytest.raises(CharsetError, match="'天地'"):
        read_charsets(tmp_path / "bad.json")
    (tmp_path / "good.txt").write_text("天\n地\n", encoding="utf-8")
    assert read_charsets(tmp_path / "good.txt") == {"good": ["天", "地"]}
    (tmp_path / "windows.txt").write_bytes("天\r\n地\r\n".encode())
    assert read_charsets(tmp_path / "windows.txt") == {"windows": ["天", "地"]}


def test_symbol_files_split_on_line_ends_only(tmp_path):
    (tmp_path / "symbols.txt").write_bytes("<p>\r\n</p >\n \n\u2028\n\n".encode())
    assert read_lines(tmp_path / "symbols.txt") == ["<p>", "</p >", " ", "\u2028"]
