"""Data pipeline throughput: `prepare` with 1 and 2 worker processes, on Beam, and the loader from page cache.

Input is the embedded demo corpus (`hammer data demo`: zh, en, code train files), listed --repeat
times (so that starting the worker processes, ~0.5 s, is amortized as on a real corpus). The tokenizer is
HammerLLM's (105789 pieces, so uint32 shards) when ../shared/hammerllm is there, else --tokenizer.
Rows:
- tokenize only: `Tokenizer.encode_batch` over the same documents in one process: the ceiling;
- prepare, N workers: the whole `prepare` (read, tokenize, pack, write, fsync, index), whose outputs
  must be byte-identical across N;
- prepare on Beam: `--engine beam` on Beam's DirectRunner with 2 worker processes (its default for
  --workers 2), start-up of the pipeline and its workers included; its output must be byte-identical
  to the local engine's. On 2 cores this shows Beam's overhead (workers, work files written and read
  back), not its scale-out. The prepare rows also give the CPU seconds of the process and its
  workers: on a machine other work shares, tokens per CPU second compare the engines where
  wall-clock tokens/s measure the sharing;
- loader: `Loader` batches of 8 x 2048 from the prepared shards, pinned to one core, shards already in
  page cache (read once first), a shuffled mixture of the corpus with itself.
Writes bench/results/data_throughput.json and prints a table.

    python bench/data_throughput.py [--tokenizer DIR] [--mb 2] [--repeat 4] [--batches 2000]

(The committed result ran with --repeat 16, so that Beam's start-up, ~5 s, is amortized as on a corpus.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hammer.data import Loader, Mixture, load_prepared, prepare  # noqa: E402
from hammer.data.demo import DOMAINS, build_demo_corpus  # noqa: E402
from hammer.data.prepare_beam import prepare_on_beam  # noqa: E402
from hammer.data.sources import open_source  # noqa: E402
from hammer.tokenizer import Tokenizer  # noqa: E402

DEFAULT_TOKENIZER = REPO.parent / "shared" / "hammerllm" / "tokenizer"


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (worker processes), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    parser.add_argument("--mb", type=float, default=2.0, help="MiB of text per domain")
    parser.add_argument("--repeat", type=int, default=4, help="times each input file is listed")
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=2048)
    args = parser.parse_args()
    load_at_start = round(os.getloadavg()[0], 2)  # other work on the cores slows the parallel rows

    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_demo_corpus(tmp / "corpus", max_bytes=int(args.mb * 2**20))
        inputs = [tmp / "corpus" / "train" / f"{d}.jsonl" for d in DOMAINS] * args.repeat
        texts = [doc.text for path in inputs for doc in open_source(path).documents()]
        megabytes = sum(len(t.encode()) for t in texts) / 1e6

        start = time.perf_counter()
        tokens = sum(len(ids) + 2 for ids in tokenizer.encode_batch(texts, add_special_tokens=False))
        seconds = time.perf_counter() - start
        rows.append({"what": "tokenize only (1 process)", "seconds": seconds, "tokens_per_s": tokens / seconds,
                     "mb_per_s": megabytes / seconds})

        outputs = {}
        for workers in (1, 2):
            out = tmp / f"prepared-{workers}"
            start, cpu = time.perf_counter(), cpu_seconds()
            index = prepare(args.tokenizer, inputs, out, block_size=args.block_size, workers=workers)
            seconds = time.perf_counter() - start
            outputs[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
            rows.append({"what": f"prepare, {workers} worker{'s' * (workers > 1)}", "seconds": seconds,
                         "cpu_seconds": cpu_seconds() - cpu, "tokens_per_s": index["tokens"] / seconds,
                         "mb_per_s": megabytes / seconds})
        out = tmp / "prepared-beam"
        start, cpu = time.perf_counter(), cpu_seconds()
        index, _ = prepare_on_beam(args.tokenizer, inputs, out, block_size=args.block_size, workers=2)
        seconds = time.perf_counter() - start
        rows.append({"what": "prepare on Beam, 2 workers", "seconds": seconds, "cpu_seconds": cpu_seconds() - cpu,
                     "tokens_per_s": index["tokens"] / seconds, "mb_per_s": megabytes / seconds})
        beam_identical = {p.name: p.read_bytes() for p in sorted(out.iterdir())} == outputs[1]
        identical = outputs[1] == outputs[2]
        # Wall time shows what other work on the cores took; CPU time per token does not.
        beam_vs_local = rows[-1]["tokens_per_s"] / rows[-2]["tokens_per_s"]
        beam_vs_local_cpu = rows[-2]["cpu_seconds"] / rows[-1]["cpu_seconds"]

        dataset = load_prepared(tmp / "prepared-1")
        dataset.verify_checksums()  # also reads every shard into page cache
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        loader = Loader(Mixture([dataset, load_prepared(tmp / "prepared-2")]), args.batch_size, seed=0)
        next(loader)  # untimed: opens the shards' memory maps
        start = time.perf_counter()
        for _ in range(args.batches):
            batch = next(loader)
        seconds = time.perf_counter() - start
        loaded = args.batches * batch.size
        rows.append({"what": f"loader {args.batch_size}x{args.block_size}, 1 core", "seconds": seconds,
                     "tokens_per_s": loaded / seconds, "mb_per_s": None})

    result = {"tokenizer": str(args.tokenizer), "vocab_size": tokenizer.vocab_size, "corpus_mb": megabytes,
              "repeat": args.repeat, "tokens": index["tokens"], "blocks": index["blocks"],
              "prepare_outputs_identical": identical, "beam_output_identical": beam_identical,
              "beam_vs_local_2_workers": beam_vs_local, "beam_vs_local_2_workers_per_cpu_second": beam_vs_local_cpu,
              "cpus": os.cpu_count(), "load_average_at_start": load_at_start,
              "python": platform.python_version(), "rows": rows}
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "data_throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"corpus {megabytes:.1f} MB, {index['tokens']} tokens, {index['blocks']} blocks; tokenizer vocab "
          f"{tokenizer.vocab_size}; {os.cpu_count()} CPUs, load average {load_at_start} at start; "
          f"1- and 2-worker outputs identical: {identical}; Beam's identical: {beam_identical}; Beam / local "
          f"with 2 workers: {beam_vs_local:.2f}x in tokens/s, {beam_vs_local_cpu:.2f}x in tokens per CPU second")
    print(f"| {'what':<28} | {'seconds':>8} | {'CPU s':>6} | {'tokens/s':>11} | {'MB/s':>6} |")
    print(f"|{'-' * 30}|{'-' * 9}:|{'-' * 7}:|{'-' * 12}:|{'-' * 7}:|")
    for row in rows:
        mb = f"{row['mb_per_s']:.2f}" if row["mb_per_s"] is not None else ""
        cpu = f"{row['cpu_seconds']:.1f}" if "cpu_seconds" in row else ""
        print(f"| {row['what']:<28} | {row['seconds']:>8.2f} | {cpu:>6} | {row['tokens_per_s']:>11,.0f} | {mb:>6} |")


if __name__ == "__main__":
    main()
