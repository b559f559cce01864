"""`geode data prepare`: sources -> filters -> dedup -> decontamination -> tokenize -> pack.

The recipe (`DataRecipe`, a TOML file) lists the sources and the settings of every stage.
Documents stream through the stages one source at a time, in recipe order; deduplication is
global (a document repeating one of an earlier source is dropped). The output directory is
built in a staging directory beside it and swapped in only when complete (see pack.py).
The returned summary counts documents, tokens and bytes per source, drops per filter rule,
the dedup rate and decontamination drops; `format_summary` renders it as a table.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from ..fileio import sha256_file, swap_dir_into_place
from ..recipe import load_recipe, recipe_to_dict
from . import DataError
from .decontam import DecontamConfig, Decontaminator
from .dedup import DedupConfig, ExactDedup, NearDedup
from .filters import FilterConfig, QualityFilter
from .mixture import MixtureConfig, MixtureSchedule
from .pack import (
    FORMAT,
    MANIFEST,
    VERSION,
    StreamWriter,
    TokenizerLike,
    choose_dtype,
    write_json_atomic,
)
from .sources import Document, SourceConfig, read_source


@dataclass
class PackConfig:
    """How documents become token files."""

    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    shard_tokens: int = 1 << 26  # tokens per shard file (documents never straddle shards)
    add_bos: bool = True  # begin every document with <bos>
    add_eos: bool = True  # end every document with <eos>
    batch_docs: int = 256  # documents per tokenizer call


@dataclass
class DataRecipe:
    """A `geode data prepare` recipe."""

    sources: list[SourceConfig]
    tokenizer: str = ""  # tokenizer.model file or a checkpoint directory holding one
    out: str = "data/prepared"  # output directory
    filters: FilterConfig = field(default_factory=FilterConfig)  # default for every source
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    mixture: MixtureConfig | None = None  # the loader's default schedule for this data

    def __post_init__(self) -> None:
        if not self.sources:
            raise DataError("a data recipe needs at least one [[sources]] entry")
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DataError(f"source names must be unique; repeated: {', '.join(dup)}")
        if self.mixture is not None:
            MixtureSchedule(self.mixture, names)  # validates names and weights


def load_data_recipe(path: str | Path) -> DataRecipe:
    """Read a data recipe from TOML (unknown keys are errors)."""
    return load_recipe(DataRecipe, path)


# ---------------------------------------------------------------------------- staging
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clear_stale_staging(out: Path) -> None:
    """Remove staging dirs of earlier runs into `out` whose process is gone."""
    for p in out.parent.glob(f".{out.name}.staging-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise DataError(
            f"output {out} is a non-empty directory that is not a prepared dataset; "
            "refusing to replace it (choose another --out)"
        )


# ---------------------------------------------------------------------------- pipeline
def _load_tokenizer(spec: str | TokenizerLike) -> tuple[TokenizerLike, dict[str, Any]]:
    if not isinstance(spec, str | Path):
        return spec, {"path": None, "sha256": None}
    if not str(spec):
        raise DataError("no tokenizer: set `tokenizer` in the recipe or pass --tokenizer")
    from ..tokenizer import find_tokenizer, load_tokenizer

    tok = load_tokenizer(spec)
    model = find_tokenizer(spec)  # the file load_tokenizer read (tokenizer.model / .json)
    return tok, {"path": str(model), "sha256": sha256_file(model)}


def _progress(total: int | None, desc: str, enabled: bool):
    from ..progress import progress

    return progress(total, desc, "doc", enabled=enabled)


def prepare(
    recipe: DataRecipe | str | Path,
    out: str | Path | None = None,
    tokenizer: str | TokenizerLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the pipeline; write the dataset to `out` (default recipe.out); return the summary."""
    if not isinstance(recipe, DataRecipe):
        recipe = load_data_recipe(recipe)
    out = Path(out if out is not None else recipe.out).expanduser().absolute()
    tok, tok_info = _load_tokenizer(tokenizer if tokenizer is not None else recipe.tokenizer)
    dtype = choose_dtype(tok.vocab_size, recipe.pack.dtype)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_staging(out)
    staging = out.with_name(f".{out.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        summary = _run(recipe, tok, dtype, staging, progress)
        summary["out"] = str(out)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": dtype,
            "vocab_size": tok.vocab_size,
            **{k: getattr(tok, k, None) for k in ("bos_id", "eos_id", "pad_id")},
            "add_bos": recipe.pack.add_bos,
            "add_eos": recipe.pack.add_eos,
            "tokenizer": tok_info,
            "streams": summary.pop("_streams"),
            "summary": summary,
            "recipe": recipe_to_dict(recipe),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(staging / MANIFEST, manifest)  # last: marks the dataset complete
        swap_dir_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _run(
    recipe: DataRecipe, tok: TokenizerLike, dtype: str, root: Path, progress: bool
) -> dict[str, Any]:
    t_start = time.perf_counter()
    timing = Counter()
    decon = Decontaminator(recipe.decontam.ngram, recipe.decontam.min_words)
    t = time.perf_counter()
    for eval_cfg in recipe.decontam.eval_sets:
        decon.add_all((f"{eval_cfg.name}:{d.id}", d.text) for d in read_source(eval_cfg))
    timing["decontam_index"] += time.perf_counter() - t
    exact = ExactDedup() if recipe.dedup.exact else None
    d = recipe.dedup
    near = NearDedup(d.threshold, d.num_perm, d.shingle, d.seed) if d.near else None
    streams: dict[str, Any] = {}
    per_source: dict[str, dict[str, Any]] = {}
    stages = _Stages(recipe, tok, exact, near, decon, timing, progress)
    with open(root / "decontam.jsonl", "w", encoding="utf-8") as report:
        for cfg in recipe.sources:
            writer = StreamWriter(root, cfg.name, dtype, recipe.pack.shard_tokens)
            try:
                per_source[cfg.name] = stages.source(cfg, writer, report)
                streams[cfg.name] = writer.close()
            except BaseException:
                writer.abort()
                raise
    return _summarize(per_source, streams, decon, timing, time.perf_counter() - t_start, dtype)


@dataclass
class _Stages:
    """The per-document stages shared by all sources of one run."""

    recipe: DataRecipe
    tok: TokenizerLike
    exact: ExactDedup | None
    near: NearDedup | None
    decon: Decontaminator
    timing: Counter
    progress: bool

    def source(self, cfg: SourceConfig, writer: StreamWriter, report: IO[str]) -> dict[str, Any]:
        """Stream one source through filter -> dedup -> decontam -> tokenize -> pack."""
        qf = QualityFilter(cfg.filters if cfg.filters is not None else self.recipe.filters)
        stats: dict[str, Any] = dict(documents_in=0, documents=0, tokens=0, bytes_in=0, bytes=0)
        dropped: Counter[str] = Counter()
        batch: list[Document] = []
        total = cfg.n if cfg.kind == "tasks" else None
        with _progress(total, cfg.name, self.progress) as bar:
            t0 = time.perf_counter()
            for doc in read_source(cfg):
                self.timing["read"] += time.perf_counter() - t0
                bar.update(1)
                size = len(doc.text.encode("utf-8"))
                stats["documents_in"] += 1
                stats["bytes_in"] += size
                reason = self.screen(doc, qf, report, cfg.near_dedup)
                if reason:
                    dropped[reason] += 1
                else:
                    stats["documents"] += 1
                    stats["bytes"] += size
                    batch.append(doc)
                    if len(batch) >= self.recipe.pack.batch_docs:
                        stats["tokens"] += self.pack(batch, writer)
                t0 = time.perf_counter()
            if batch:
                stats["tokens"] += self.pack(batch, writer)
        stats["dropped"] = dict(sorted(dropped.items()))
        return stats

    def pack(self, batch: list[Document], writer: StreamWriter) -> int:
        """Tokenize and append a batch of documents (then empty the batch); returns tokens."""
        t = time.perf_counter()
        p = self.recipe.pack
        ids = self.tok.encode_batch([d.text for d in batch], add_bos=p.add_bos, add_eos=p.add_eos)
        n = writer.add(ids, [d.id for d in batch])
        batch.clear()
        self.timing["tokenize_pack"] += time.perf_counter() - t
        return n

    def screen(
        self, doc: Document, qf: QualityFilter, report: IO[str], near_dedup: bool = True
    ) -> str | None:
        """Why `doc` is dropped ('filter:<rule>', 'exact_dup', 'near_dup', 'decontam'), or None."""
        t = time.perf_counter()
        reason = qf.check(doc.text)
        self.timing["filter"] += time.perf_counter() - t
        if reason:
            return f"filter:{reason}"
        t = time.perf_counter()
        try:
            if self.exact is not None and self.exact.check(doc.id, doc.text) is not None:
                return "exact_dup"
            near = self.near if near_dedup else None
            if near is not None and near.check(doc.id, doc.text) is not None:
                return "near_dup"
        finally:
            self.timing["dedup"] += time.perf_counter() - t
        t = time.perf_counter()
        match = self.decon.check(doc.text)
        self.timing["decontam"] += time.perf_counter() - t
        if match is not None:
            row = {"doc": doc.id, "source": doc.source, "eval_item": match.eval_id}
            row["ngram"] = match.ngram
            report.write(json.dumps(row, ensure_ascii=False) + "\n")
            return "decontam"
        return None


def _summarize(
    per_source: dict[str, dict[str, Any]],
    streams: dict[str, Any],
    decon: Decontaminator,
    timing: Counter,
    seconds: float,
    dtype: str,
) -> dict[str, Any]:
    total: dict[str, Any] = dict(documents_in=0, documents=0, tokens=0, bytes_in=0, bytes=0)
    dropped: Counter[str] = Counter()
    for s in per_source.values():
        for k in total:
            total[k] += s[k]
        dropped.update(s["dropped"])
    total["dropped"] = dict(sorted(dropped.items()))
    filtered = sum(v for k, v in dropped.items() if k.startswith("filter:"))
    after_filters = total["documents_in"] - filtered
    dups = dropped["exact_dup"] + dropped["near_dup"]
    total["dedup_rate"] = dups / after_filters if after_filters else 0.0
    total["decontam_drops"] = dropped["decontam"]
    tp = timing["tokenize_pack"]
    return {
        "dtype": dtype,
        "sources": per_source,
        "total": total,
        "decontam": {"eval_items": decon.items, "eval_items_too_short": len(decon.skipped)},
        "seconds": round(seconds, 3),
        "timing": {k: round(v, 3) for k, v in sorted(timing.items())},
        "tokenize_pack_mb_per_s": round(total["bytes"] / tp / 1e6, 3) if tp else None,
        "overall_mb_per_s": round(total["bytes_in"] / seconds / 1e6, 3) if seconds else None,
        "_streams": streams,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A readable table of a `prepare` summary."""
    rows = [("source", "docs in", "docs out", "tokens", "MB out", "dropped")]
    items = [*summary["sources"].items(), ("TOTAL", summary["total"])]
    for name, s in items:
        drops = ", ".join(f"{k}={v}" for k, v in s["dropped"].items()) or "-"
        rows.append(
            (
                name,
                str(s["documents_in"]),
                str(s["documents"]),
                str(s["tokens"]),
                f"{s['bytes'] / 1e6:.2f}",
                drops,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for i, r in enumerate(rows):
        cells = [c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join([*cells, r[-1]]))
        if i == 0 or i == len(rows) - 2:
            lines.append("-" * len(lines[-1]))
    t = summary["total"]
    lines.append(
        f"dedup rate {t['dedup_rate']:.2%}; decontamination dropped {t['decontam_drops']} "
        f"(against {summary['decontam']['eval_items']} eval items); dtype {summary['dtype']}"
    )
    lines.append(
        f"{summary['seconds']:.1f} s; tokenize+pack {summary['tokenize_pack_mb_per_s']} MB/s; "
        f"end to end {summary['overall_mb_per_s']} MB/s -> {summary.get('out', '')}"
    )
    return "\n".join(lines)
