"""`hammer tokenizer train | merge | coverage | compression`."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from hammer.commands import examples
from hammer.fsio import atomic_directory
from hammer.tokenizer import Tokenizer


def register(subparsers) -> None:
    parser = subparsers.add_parser("tokenizer", help="train, merge and judge SentencePiece tokenizers",
                                   description="Train, merge and judge Llama-format SentencePiece tokenizers.",
                                   **examples("hammer tokenizer train --input corpus.jsonl --output runs/tok --vocab-size 32000",
                                              "hammer tokenizer coverage runs/tok --json"))
    commands = parser.add_subparsers(dest="tokenizer_command", metavar="TOOL", required=True)

    p = commands.add_parser("train", help="train a SentencePiece BPE tokenizer from txt/jsonl files", **examples(
        "hammer tokenizer train --input zh.jsonl en.jsonl code.jsonl --output runs/tok --vocab-size 32000",
        "hammer tokenizer train --input corpus.txt --output runs/tok --vocab-size 8192 --required-chars chars.tsv"))
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".txt (a line a sentence) or .jsonl ('text')")
    p.add_argument("--output", required=True, type=Path, help="new tokenizer directory (must not exist)")
    p.add_argument("--vocab-size", required=True, type=int)
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false")
    p.add_argument("--no-split-digits", dest="split_digits", action="store_false")
    p.add_argument("--user-defined-symbols", type=Path, metavar="FILE", help="UTF-8 file, one symbol a line")
    p.add_argument("--required-chars", type=Path, metavar="FILE",
                   help="characters that must be pieces (.tsv table, charsets .json or one a line)")
    p.add_argument("--input-sentence-size", type=int, default=0, help="sample this many sentences (0: all)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of lines")
    p.set_defaults(func=run_train)

    p = commands.add_parser("merge", help="HammerLLM's merge: base model + missing characters + symbols", **examples(
        "hammer tokenizer merge --base internlm-7b/tokenizer.model --second llama_zh_1b/tokenizer.model \\",
        "    --symbols user_defined_symbol_file.txt --output runs/merged"))
    p.add_argument("--base", required=True, type=Path, help="base tokenizer (directory or .model)")
    p.add_argument("--second", required=True, type=Path, help="model whose scores the added characters take")
    p.add_argument("--output", required=True, type=Path, help="new tokenizer directory (must not exist)")
    p.add_argument("--chars", type=Path, metavar="FILE",
                   help="characters to add when missing (default: the three levels of 《通用规范汉字表》)")
    p.add_argument("--calibration-chars", type=Path, metavar="FILE",
                   help="characters whose score ratio calibrates (default: level 1 of 《通用规范汉字表》)")
    p.add_argument("--ratio", type=float, help="use this calibration ratio instead of computing it")
    p.add_argument("--symbols", type=Path, metavar="FILE", help="user-defined symbols, UTF-8, one a line")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of lines")
    p.set_defaults(func=run_merge)

    p = commands.add_parser("coverage", help="share of character sets that are single pieces", **examples(
        "hammer tokenizer coverage runs/merged", "hammer tokenizer coverage runs/merged --charset charsets_char.json --json"))
    p.add_argument("path", type=Path, help="tokenizer directory or .model")
    p.add_argument("--charset", type=Path, metavar="FILE",
                   help="character sets (.json as HammerLLM's, .tsv table, or one a line); "
                        "default: the three levels of 《通用规范汉字表》 (FCC/SCC/TCC)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_coverage)

    p = commands.add_parser("compression", help="bytes per token, and tokens relative to a base tokenizer", **examples(
        "hammer tokenizer compression runs/merged --data sample.txt --base llama2-7b --workers 4"))
    p.add_argument("path", type=Path, help="tokenizer directory or .model")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help=".txt (a line a document) or .jsonl")
    p.add_argument("--base", type=Path, help="tokenizer to compare with (compared = tokens / base tokens)")
    p.add_argument("--workers", type=int, default=1, help="encoding threads")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_compression)


def run_train(args) -> int:
    from hammer.tokenizer.charsets import read_charsets, read_lines
    from hammer.tokenizer.train import TrainConfig, corpus_sentences, train

    _refuse_existing(args.output)
    config = TrainConfig(
        vocab_size=args.vocab_size, character_coverage=args.character_coverage,
        byte_fallback=args.byte_fallback, split_digits=args.split_digits,
        user_defined_symbols=read_lines(args.user_defined_symbols) if args.user_defined_symbols else [],
        required_chars=_all_chars(read_charsets(args.required_chars)) if args.required_chars else [],
        input_sentence_size=args.input_sentence_size)
    sentences = corpus_sentences(args.input)
    tok = Tokenizer(train(sentences, config), name=str(args.output))
    with atomic_directory(args.output) as tmp:
        tok.save_pretrained(tmp)
    _report(args, {"output": str(args.output), "sentences": len(sentences), "vocab_size": tok.vocab_size,
                   "fingerprint": tok.fingerprint})
    return 0


def run_merge(args) -> int:
    from hammer.tokenizer.charsets import read_charsets, read_lines, tgh_levels
    from hammer.tokenizer.merge import calibration_ratio, merge, parse_model

    _refuse_existing(args.output)
    base = parse_model(Tokenizer.from_pretrained(args.base).model_proto)
    second = parse_model(Tokenizer.from_pretrained(args.second).model_proto)
    levels = tgh_levels()
    chars = _all_chars(read_charsets(args.chars)) if args.chars else _all_chars(levels)
    symbols = read_lines(args.symbols) if args.symbols else []
    if args.ratio is None:
        calibration = _all_chars(read_charsets(args.calibration_chars)) if args.calibration_chars else levels["FCC"]
        ratio = calibration_ratio(base, second, calibration)
    else:
        ratio = args.ratio
    merged, report = merge(base, second, chars, symbols, ratio)
    tok = Tokenizer(merged.SerializeToString(), name=str(args.output))
    with atomic_directory(args.output) as tmp:
        tok.save_pretrained(tmp)
    _report(args, {"output": str(args.output), **dataclasses.asdict(report), "fingerprint": tok.fingerprint})
    return 0


def run_coverage(args) -> int:
    from hammer.tokenizer.charsets import read_charsets, tgh_levels
    from hammer.tokenizer.metrics import coverage

    charsets = read_charsets(args.charset) if args.charset else tgh_levels()
    tok = Tokenizer.from_pretrained(args.path)
    rows = coverage(tok, charsets)
    if args.json:
        print(json.dumps({"tokenizer": str(args.path), "coverage": [
            {"set": r.name, "covered": r.covered, "total": r.total, "percent": round(r.percent, 2)} for r in rows]},
            ensure_ascii=False, indent=2))
    else:
        _table(["set", "covered", "total", "%"],
               [[r.name, r.covered, r.total, f"{r.percent:.2f}"] for r in rows])
    return 0


def run_compression(args) -> int:
    from hammer.tokenizer.metrics import compression

    tok = Tokenizer.from_pretrained(args.path)
    base = Tokenizer.from_pretrained(args.base) if args.base else None
    rows = compression(tok, args.data, base, num_workers=args.workers)
    if args.json:
        print(json.dumps({"tokenizer": str(args.path), "base": str(args.base) if args.base else None, "files": [
            {"file": r.name, "bytes": r.bytes, "tokens": r.tokens, "bytes_per_token": round(r.bytes_per_token, 4),
             "base_tokens": r.base_tokens, "compared": None if r.compared is None else round(r.compared, 4)}
            for r in rows]}, ensure_ascii=False, indent=2))
    else:
        header = ["file", "bytes", "tokens", "bytes/token"] + (["base tokens", "compared"] if base else [])
        _table(header, [[r.name, r.bytes, r.tokens, f"{r.bytes_per_token:.3f}"]
                        + ([r.base_tokens, f"{r.compared:.4f}" if r.compared is not None else "-"] if base else [])
                        for r in rows])
    return 0


def _refuse_existing(output: Path) -> None:
    """Checked before any work, so a long training run never ends on a path it may not write."""
    if output.exists():
        raise FileExistsError(f"output {output} already exists; choose a new path or remove it")


def _all_chars(charsets: dict[str, list[str]]) -> list[str]:
    return [c for chars in charsets.values() for c in chars]


def _report(args, summary: dict) -> None:
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, indent=2))
    else:
        print("\n".join(f"{k}: {v}" for k, v in summary.items()))


def _table(header: list[str], rows: list[list]) -> None:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
