"""Benchmark: throughput (MB/s) of `geode data prepare` on tinyshakespeare + the stdlib corpus.

Trains a SentencePiece tokenizer on the same text first (not timed), then times, as the
median of several repetitions after a warm-up:
  prepare      the whole pipeline (read, filters, exact + near dedup, decontam, tokenize, pack)
  tok+pack     the tokenize + pack stage inside that pipeline
  reference    bare SentencePiece batch encoding of the same documents plus a numpy write:
               the floor a packer built on SentencePiece can reach (ratio = ours / reference)
Prints one JSON line per measurement, then a table.

usage: python bench/data_prepare.py [--shakespeare PATH] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from geode.data.dedup import DedupConfig
from geode.data.prepare import DataRecipe, PackConfig, prepare
from geode.data.sources import SourceConfig, read_source
from geode.tokenizer import load_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def main() -> None:
    """Run the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shakespeare", type=Path, default=DEFAULT_SHAKESPEARE)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="SentencePiece encoding threads")
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()

    sources = [SourceConfig(name="stdlib", kind="stdlib")]
    if args.shakespeare.is_file():
        sources.insert(
            0,
            SourceConfig(
                name="shakespeare", kind="text", paths=[str(args.shakespeare)], split_by="paragraph"
            ),
        )
    else:
        print(f"# {args.shakespeare} not found: benchmarking the stdlib corpus only")
    recipe = DataRecipe(
        sources=sources, dedup=DedupConfig(exact=True, near=True), pack=PackConfig(dtype="auto")
    )
    docs = [d.text for s in sources for d in read_source(s)]
    mb = sum(len(t.encode("utf-8")) for t in docs) / 1e6

    work = Path(tempfile.mkdtemp(prefix="geode-bench-data-"))
    try:
        t0 = time.perf_counter()
        train_tokenizer(
            texts=docs, vocab_size=args.vocab, out=work / "tok", max_input_bytes=8_000_000
        )
        train_s = time.perf_counter() - t0
        tok = load_tokenizer(work / "tok", num_threads=args.threads)

        def run_prepare() -> dict:
            return prepare(recipe, out=work / "data", tokenizer=tok, progress=False)

        def run_reference() -> float:
            t = time.perf_counter()
            ids = tok._sp.encode(docs, num_threads=args.threads)  # bare SentencePiece
            flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64)
            flat.astype(np.uint16).tofile(work / "ref.bin")
            return time.perf_counter() - t

        run_prepare()  # warm-up (page cache, imports)
        run_reference()
        summaries, refs = [], []
        for _ in range(args.reps):  # interleaved, so load from other processes hits both
            summaries.append(run_prepare())
            refs.append(run_reference())
        ref_s = statistics.median(refs)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    s = summaries[0]
    total_s = statistics.median(x["seconds"] for x in summaries)
    tp_s = statistics.median(x["timing"]["tokenize_pack"] for x in summaries)
    kept_mb = s["total"]["bytes"] / 1e6
    common = {
        "bench": "data_prepare",
        "input_mb": round(mb, 3),
        "documents": s["total"]["documents_in"],
        "tokens": s["total"]["tokens"],
        "vocab": args.vocab,
        "threads": args.threads,
        "reps": args.reps,
    }
    rows = [
        ("prepare (end to end)", mb, total_s),
        ("tokenize+pack stage", kept_mb, tp_s),
        ("reference: bare SentencePiece + write", mb, ref_s),
    ]
    for name, size, secs in rows:
        line = {
            **common,
            "measure": name,
            "seconds": round(secs, 3),
            "mb_per_s": round(size / secs, 3),
        }
        print(json.dumps(line))
    print(json.dumps({**common, "measure": "timing breakdown (first rep)", **s["timing"]}))
    print(
        f"\ntokenizer training (untimed in rows): {train_s:.1f} s; dedup rate "
        f"{s['total']['dedup_rate']:.2%}; dropped {s['total']['dropped']}"
    )
    print(f"{'measure':40s} {'MB':>8s} {'s':>8s} {'MB/s':>8s}")
    for name, size, secs in rows:
        print(f"{name:40s} {size:8.2f} {secs:8.2f} {size / secs:8.2f}")
    print(
        f"{'ratio tok+pack / reference':40s} {'':8s} {'':8s} {(kept_mb / tp_s) / (mb / ref_s):8.2f}"
    )


if __name__ == "__main__":
    main()
