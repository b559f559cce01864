"""Data: sources, synthetic verifiable tasks, filters, dedup, decontamination, packing, loading.

One concern per module:
  sources   documents from text files, JSONL, the local Python standard library, tasks
  tasks     synthetic multi-step arithmetic word problems with an exact verifier
  filters   heuristic quality filters (length, symbols, repetition; Gopher rules)
  dedup     exact (hash) and near-duplicate (MinHash LSH via datasketch) removal
  decontam  drop training documents sharing long n-grams with evaluation sets
  pack      tokenized, sharded, memory-mapped token files + manifest; the reader
  mixture   weights over sources that change by training step
  loader    deterministic, resumable, rank-sharded loader of packed sequences
  prepare   the `geode data prepare` pipeline tying these together

This package file stays import-light; import the submodule you need.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input or a corrupt prepared dataset; the message names file, field and value."""
