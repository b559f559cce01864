"""Document sources: plain text files, JSONL, the local Python standard library, generated tasks.

Every source yields `Document`s (text + a stable id naming where it came from), lazily, in a
deterministic order. Errors name the file (and line and field for JSONL): a missing or
unreadable file, an empty file, invalid UTF-8 or JSON, a record without the text field.
Relative paths are relative to the current directory; glob patterns (`data/*.txt`) are
expanded and sorted.
"""

from __future__ import annotations

import glob
import json
import os
import re
import string
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from . import DataError
from .filters import FilterConfig
from .tasks import HELDOUT_FRACTION, iter_problems

SourceKind = Literal["text", "jsonl", "stdlib", "tasks"]
_TEST_DIRS = {"test", "tests", "idle_test"}  # the standard library's test suites
_SITE_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(slots=True)
class Document:
    """One document: its text, a stable id (file, line, paragraph or task uid), its source."""

    text: str
    id: str
    source: str


@dataclass
class SourceConfig:
    """Where documents come from; the fields used depend on `kind`."""

    name: str  # unique within a recipe; names the packed stream and report rows
    kind: SourceKind = "text"
    # text / jsonl
    paths: list[str] = field(default_factory=list)  # files or glob patterns
    split_by: Literal["file", "paragraph", "line"] = "file"  # text: one document per ...
    text_field: str = "text"  # jsonl: the field holding the text
    template: str = ""  # jsonl: e.g. "{question}\n{answer}"; overrides text_field when set
    # stdlib
    include_tests: bool = False  # also read Lib/test/** (about 2.5x more code)
    # tasks
    n: int = 1000
    seed: int = 0
    split: Literal["train", "heldout"] = "train"
    min_steps: int = 2
    max_steps: int = 4
    max_value: int = 100
    heldout_fraction: float = HELDOUT_FRACTION
    # any kind
    max_docs: int = 0  # stop after this many documents (0: no limit)
    max_bytes: int = 0  # stop once this many UTF-8 bytes were read (0: no limit)
    filters: FilterConfig | None = None  # this source's filters (default: the recipe's)
    near_dedup: bool = True  # false: skip near-dedup here (exact dedup still applies)

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise DataError(
                f"source name must be letters, digits, '_', '.', '-'; got {self.name!r}"
            )
        if self.kind in ("text", "jsonl") and not self.paths:
            raise DataError(f"source {self.name!r}: kind {self.kind!r} needs `paths`")


def read_source(cfg: SourceConfig) -> Iterator[Document]:
    """The documents of one source, in a fixed order, honouring max_docs / max_bytes."""
    if cfg.kind == "text":
        docs = _read_text(cfg)
    elif cfg.kind == "jsonl":
        docs = _read_jsonl(cfg)
    elif cfg.kind == "stdlib":
        docs = _read_stdlib(cfg)
    elif cfg.kind == "tasks":
        docs = _read_tasks(cfg)
    else:
        raise DataError(f"source {cfg.name!r}: unknown kind {cfg.kind!r}")
    count = size = 0
    for doc in docs:
        if cfg.max_docs and count >= cfg.max_docs:
            return
        if cfg.max_bytes and size >= cfg.max_bytes:
            return
        count += 1
        size += len(doc.text.encode("utf-8"))
        yield doc


def expand_paths(source: str, patterns: list[str]) -> list[Path]:
    """Files named by `patterns` (globs allowed), sorted within each pattern; errors if none."""
    out: list[Path] = []
    for pattern in patterns:
        expanded = str(Path(pattern).expanduser())
        if glob.has_magic(expanded):
            matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True))
            if not matches:
                raise DataError(f"source {source!r}: no file matches {pattern!r}")
            out += [p for p in matches if p.is_file()]
        else:
            path = Path(expanded)
            if not path.exists():
                raise DataError(f"source {source!r}: file not found: {path}")
            out.append(path)
    return out


def read_text_file(source: str, path: Path) -> str:
    """A file's UTF-8 text; DataError if unreadable, not UTF-8, or empty."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"source {source!r}: cannot read {path}: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"source {source!r}: {path} is not UTF-8 (byte {e.start}: {data[e.start : e.start + 4]!r})"
        ) from e
    if not text.strip():
        raise DataError(f"source {source!r}: {path} is empty")
    return text


def _read_text(cfg: SourceConfig) -> Iterator[Document]:
    for path in expand_paths(cfg.name, cfg.paths):
        text = read_text_file(cfg.name, path)
        if cfg.split_by == "file":
            yield Document(text, str(path), cfg.name)
        elif cfg.split_by == "paragraph":
            for i, para in enumerate(re.split(r"\n\s*\n", text)):
                if para.strip():
                    yield Document(para.strip("\n"), f"{path}#p{i}", cfg.name)
        else:
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    yield Document(line, f"{path}:{i}", cfg.name)


def _template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _read_jsonl(cfg: SourceConfig) -> Iterator[Document]:
    fields = _template_fields(cfg.template) if cfg.template else [cfg.text_field]
    for path in expand_paths(cfg.name, cfg.paths):
        text = read_text_file(cfg.name, path)
        records = 0
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"source {cfg.name!r}: {path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            for f in fields:
                if f not in rec:
                    have = ", ".join(sorted(rec)) or "none"
                    raise DataError(f"{where}: no field {f!r} (fields: {have})")
                if not isinstance(rec[f], str):
                    kind = type(rec[f]).__name__
                    raise DataError(f"{where}: field {f!r} must be a string, got {kind}")
            body = cfg.template.format(**rec) if cfg.template else rec[cfg.text_field]
            records += 1
            yield Document(body, f"{path}:{lineno}", cfg.name)
        if not records:
            raise DataError(f"source {cfg.name!r}: {path} has no JSON records")


def stdlib_root() -> Path:
    """The directory of this Python installation's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(include_tests: bool = False) -> list[Path]:
    """The standard library's *.py files (no site-packages), sorted by relative path."""
    root = stdlib_root()
    skip = _SITE_DIRS if include_tests else _SITE_DIRS | _TEST_DIRS
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]  # prune in place
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_stdlib(cfg: SourceConfig) -> Iterator[Document]:
    root = stdlib_root()
    files = stdlib_files(cfg.include_tests)
    if not files:
        raise DataError(f"source {cfg.name!r}: no *.py files under {root}")
    for path in files:
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a few stdlib files are deliberately not UTF-8 (encoding tests)
        if text.strip():
            yield Document(text, f"stdlib:{path.relative_to(root).as_posix()}", cfg.name)


def _read_tasks(cfg: SourceConfig) -> Iterator[Document]:
    problems = iter_problems(
        seed=cfg.seed,
        split=cfg.split,
        min_steps=cfg.min_steps,
        max_steps=cfg.max_steps,
        max_value=cfg.max_value,
        heldout_fraction=cfg.heldout_fraction,
    )
    for _, p in zip(range(cfg.n), problems):
        yield Document(p.document(), f"tasks:{p.split}:{p.uid}", cfg.name)
