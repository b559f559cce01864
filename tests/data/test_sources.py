"""Document sources and their errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from geode.data import DataError
from geode.data.sources import SourceConfig, read_source, stdlib_files


def docs(**kw) -> list:
    return list(read_source(SourceConfig(name="s", **kw)))


def test_text_splitting_and_globs(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\ntwo\n\n\nthree\n")
    (tmp_path / "b.txt").write_text("four")
    pattern = str(tmp_path / "*.txt")
    assert [d.text for d in docs(paths=[pattern])] == ["one\ntwo\n\n\nthree\n", "four"]
    paras = docs(paths=[pattern], split_by="paragraph")
    assert [d.text for d in paras] == ["one\ntwo", "three", "four"]
    assert paras[0].id.endswith("a.txt#p0") and paras[0].source == "s"
    lines = docs(paths=[pattern], split_by="line")
    assert [d.text for d in lines] == ["one", "two", "three", "four"]
    assert lines[2].id.endswith("a.txt:5")
    assert len(docs(paths=[pattern], split_by="line", max_docs=2)) == 2
    assert len(docs(paths=[pattern], split_by="line", max_bytes=4)) == 2


def test_missing_unreadable_empty_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found: .*nope.txt"):
        docs(paths=[str(tmp_path / "nope.txt")])
    with pytest.raises(DataError, match="no file matches"):
        docs(paths=[str(tmp_path / "*.md")])
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(DataError, match="cannot read .*dir.txt"):
        docs(paths=[str(tmp_path / "dir.txt")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt is empty"):
        docs(paths=[str(tmp_path / "empty.txt")])
    (tmp_path / "blank.txt").write_text(" \n\n\t\n")
    with pytest.raises(DataError, match="blank.txt is empty"):
        docs(paths=[str(tmp_path / "blank.txt")])
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin.txt is not UTF-8 \\(byte 3"):
        docs(paths=[str(tmp_path / "latin.txt")])
    with pytest.raises(ValueError, match="needs `paths`"):
        SourceConfig(name="s", kind="text")
    with pytest.raises(ValueError, match="source name"):
        SourceConfig(name="a b", kind="stdlib")


def test_jsonl_fields_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert [d.text for d in docs(kind="jsonl", paths=[str(path)], text_field="question")] == [
        "q1",
        "q2",
    ]
    got = docs(kind="jsonl", paths=[str(path)], template="Q: {question}\nA: {answer}")
    assert got[1].text == "Q: q2\nA: a2" and got[1].id == f"{path}:2"
    with pytest.raises(DataError) as e:
        docs(kind="jsonl", paths=[str(path)], text_field="text")
    msg = str(e.value)
    assert f"{path}:1" in msg and "no field 'text'" in msg and "answer, question" in msg
    with pytest.raises(DataError, match="no field 'body'"):
        docs(kind="jsonl", paths=[str(path)], template="{question} {body}")
    path.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'text' must be a string, got int"):
        docs(kind="jsonl", paths=[str(path)])
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        docs(kind="jsonl", paths=[str(path)])
    path.write_text('["text"]\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: expected a JSON object, got list"):
        docs(kind="jsonl", paths=[str(path)])


def test_stdlib_corpus() -> None:
    files = stdlib_files()
    names = {f.name for f in files}
    assert "json" in {f.parent.name for f in files} and "os.py" in names
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    assert len(stdlib_files(include_tests=True)) > len(files)
    got = docs(kind="stdlib", max_docs=5)
    assert len(got) == 5 and all(d.id.startswith("stdlib:") and d.text.strip() for d in got)
    assert got == docs(kind="stdlib", max_docs=5)  # fixed order


def test_tasks_source() -> None:
    got = docs(kind="tasks", n=7, seed=3, split="heldout")
    assert len(got) == 7 and all(d.id.startswith("tasks:heldout:") for d in got)
    assert all(d.text.rstrip().splitlines()[-1].startswith("#### ") for d in got)
