"""`hammer data prepare | demo | info`: token shards from text, the demo corpus, a prepared dataset's summary."""
from __future__ import annotations

import argparse
import json
import sys

from hammer.commands import examples
from hammer.errors import HammerError
from hammer.data.prepare import DEFAULT_BLOCK_SIZE


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="prepare token shards and the demo corpus",
                                   description=__doc__.splitlines()[0], **examples(
                                       "hammer data prepare --tokenizer runs/tok --input zh.jsonl en.jsonl --output runs/data",
                                       "hammer data info runs/data --json"))
    commands = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    prepare = commands.add_parser("prepare", help="tokenize documents into shards of fixed-length blocks", **examples(
        "hammer data prepare --tokenizer runs/tok --input zh.jsonl en.jsonl code/ --output runs/data --workers 8",
        "hammer data prepare --tokenizer runs/tok --input tfds:wikipedia/20230601.en:train --output runs/wiki",
        "hammer data prepare --tokenizer runs/tok --input zh.jsonl en.jsonl --output runs/data --engine beam "
        "--workers 2",
        "hammer data prepare --tokenizer runs/tok --input gs://B/zh.jsonl --output gs://B/data --engine beam "
        '--pipeline-options="--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp"'))
    prepare.add_argument("--tokenizer", required=True, help="tokenizer directory (tokenizer.model + HF json)")
    prepare.add_argument("--input", nargs="+", required=True, metavar="FILE",
                         help=".txt (a document a line), .jsonl/.json, .parquet (optionally .gz for text "
                              "formats), a datasets save_to_disk directory, a directory of text files "
                              "(a document a file), or tfds:NAME[:SPLIT]")
    prepare.add_argument("--output", required=True, help="new directory (or an unfinished run's, to resume)")
    prepare.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                         help=f"tokens per block (default {DEFAULT_BLOCK_SIZE}); the tail after the last "
                              "full block is dropped and counted")
    prepare.add_argument("--text-field", default="text", help="field holding the text (jsonl, parquet, HF, TFDS)")
    prepare.add_argument("--workers", type=int, default=1,
                         help="tokenizer processes (with --engine beam: the DirectRunner's worker processes)")
    prepare.add_argument("--engine", choices=("local", "beam"), default="local",
                         help="local (default): tokenizer processes on this machine; beam: an Apache Beam "
                              "pipeline, the same bytes (needs the beam extra)")
    prepare.add_argument("--pipeline-options", default="", metavar="FLAGS",
                         help="Beam's own flags for --engine beam, one string after '=' "
                              "(--pipeline-options=\"--runner=FlinkRunner --flink_master=HOST:8081\"); "
                              "default: the DirectRunner with --workers processes")
    prepare.add_argument("--blocks-per-shard", type=int, default=None,
                         help="default: 2**25 tokens' worth of blocks")
    prepare.add_argument("--tfds-data-dir", default=None, help="TFDS data directory (default: TFDS's own)")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    prepare.add_argument("--json", action="store_true", help="print the dataset's index as JSON instead of a summary")
    prepare.set_defaults(func=_prepare)

    demo = commands.add_parser("demo", help="build the embedded demo corpus (zh, en, code) offline",
                               **examples("hammer data demo --output runs/corpus --max-mb 1"))
    demo.add_argument("--output", required=True, help="new directory")
    demo.add_argument("--max-mb", type=float, default=4.0, help="MiB of text per domain (default 4)")
    demo.add_argument("--json", action="store_true", help="print the corpus manifest as JSON instead of a summary")
    demo.set_defaults(func=_demo)

    info = commands.add_parser("info", help="summary of a prepared dataset (sizes checked)",
                               **examples("hammer data info runs/data", "hammer data info runs/data --verify --json"))
    info.add_argument("path")
    info.add_argument("--verify", action="store_true", help="also check every shard's sha256")
    info.add_argument("--json", action="store_true", help="print the dataset's index as JSON instead of a summary")
    info.set_defaults(func=_info)


def _prepare(args: argparse.Namespace) -> None:
    from hammer.data.prepare import prepare

    counters = {}
    if args.engine == "beam":
        from hammer.data.prepare_beam import prepare_on_beam

        index, counters = prepare_on_beam(args.tokenizer, args.input, args.output, block_size=args.block_size,
                                          text_field=args.text_field, workers=args.workers,
                                          blocks_per_shard=args.blocks_per_shard,
                                          pipeline_options=args.pipeline_options)
    elif args.pipeline_options:
        raise HammerError(f"--pipeline-options {args.pipeline_options!r} needs --engine beam")
    else:
        index = prepare(args.tokenizer, args.input, args.output, block_size=args.block_size,
                        text_field=args.text_field, workers=args.workers, blocks_per_shard=args.blocks_per_shard,
                        tfds_data_dir=args.tfds_data_dir, progress=not args.quiet)
    if args.json:
        print(json.dumps(index, indent=2, ensure_ascii=False))
    else:
        print(f"{args.output}: {_summary(index)}")
    if counters:  # Beam's metrics of this run (nothing when the output was already prepared)
        print("beam counters: " + ", ".join(f"{name} {value}" for name, value in sorted(counters.items())),
              file=sys.stderr if args.json else sys.stdout)


def _demo(args: argparse.Namespace) -> None:
    from hammer.data.demo import build_demo_corpus

    manifest = build_demo_corpus(args.output, max_bytes=int(args.max_mb * 2**20))
    if args.json:
        print(json.dumps(manifest, indent=2, ensure_ascii=False))
        return
    for domain, splits in manifest["domains"].items():
        print(f"{domain:<5}" + "  ".join(f"{split} {s['documents']} docs {s['text_bytes'] / 2**20:.2f} MiB"
                                         for split, s in splits.items()))
    print(f"wrote {args.output}/{{train,valid}}/{{zh,en,code}}.jsonl and manifest.json")


def _info(args: argparse.Namespace) -> None:
    from hammer.data.prepared import load_prepared

    dataset = load_prepared(args.path)
    if args.verify:
        dataset.verify_checksums()
    if args.json:
        print(json.dumps(dataset.metadata, indent=2, ensure_ascii=False))
        return
    print(f"{args.path}: {_summary(dataset.metadata)}")
    for source in dataset.metadata["sources"]:
        print(f"  {source['path']} ({source['format']}): {source['documents']} documents, "
              f"{source['tokens']} tokens, {source['empty_documents']} empty, "
              f"{source['invalid_utf8_documents']} with invalid UTF-8")


def _summary(index: dict) -> str:
    settings = index["settings"]
    return (f"{index['blocks']} blocks of {settings['block_size']} tokens ({settings['dtype']}) in "
            f"{len(index['shards'])} shard{'s' * (len(index['shards']) != 1)}; {index['documents']} documents, {index['tokens']} tokens, "
            f"{index['dropped_tokens']} dropped at the end")
