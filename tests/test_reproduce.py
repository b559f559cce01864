"""`geode reproduce NAME`: each claim end to end at a tiny budget (every artifact, the JSON
fields, finite and consistent numbers), the KV-cache formula against geode's cache, the
power-law diagnostic on known curves, and the CLI's errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from geode.cli import main
from geode.reproduce import REGISTRY, ReproduceError, reproduce
from geode.reproduce.common import all_finite

TINY = 0.1  # minutes: the smoke-test plan (tiny models, a few steps)


def _run(name: str, out: Path) -> dict:
    rec = reproduce(name, out, TINY, seed=0, progress=False, log=lambda s: None)
    for f in ("REPORT.md", "results.json", *rec["plots"]):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(rec))
    for key in ("name", "claim", "verdict", "holds", "seconds", "plots"):
        assert key in on_disk, key
    assert on_disk["name"] == name and isinstance(on_disk["holds"], bool)
    assert all_finite(on_disk)
    report = (out / "REPORT.md").read_text()
    for part in ("**Claim.**", "**Setup.**", "## Measured", "## Verdict", "## Plots"):
        assert part in report, part
    assert ("Yes: the claim shows" if rec["holds"] else "No: the claim does not show") in report
    for p in rec["plots"]:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({p})" in report
    return on_disk


def test_distill_vs_scratch_tiny(tmp_path):
    r = _run("distill-vs-scratch", tmp_path / "dvs")
    assert r["curve"], "no held-out evaluations"
    for row in r["curve"]:
        assert row["difference"] == pytest.approx(row["distilled"] - row["scratch"])
        assert row["tokens"] == row["step"] * r["tokens_per_step"]
    assert r["final"]["difference"] == r["curve"][-1]["difference"]
    assert r["holds"] == (r["final"]["difference"] < 0)
    assert r["student"]["hidden_size"] < r["teacher"]["hidden_size"]
    assert r["curve"][-1]["step"] == r["student"]["steps"]


def test_local_global_tiny(tmp_path):
    r = _run("local-global", tmp_path / "lg")
    assert all(c["equal"] for c in r["cache_check"])  # formula == kv_cache_bytes == HybridCache
    for row in r["per_seed"]:
        assert row["difference"] == pytest.approx(row["local_global"] - row["all_global"])
        assert row["ci95"][0] <= row["ci95"][1]
        assert 3.0 < row["all_global"] < math.log(2048)  # below uniform over the vocabulary
    kv = r["kv_cache_bytes"]
    for n in ("128", "131072"):  # local layers keep W tokens: fewer bytes past the window
        assert kv["nano 5:1"][n] < kv["nano all-global"][n]
        assert kv["gemma3-27b 5:1"][n] <= kv["gemma3-27b all-global"][n]
    assert r["kv_saving_32k"]["gemma3-27b"] > 4  # 52 of 62 layers keep 1024 of 32768 tokens


def test_teacher_hacking_tiny(tmp_path):
    r = _run("teacher-hacking", tmp_path / "th")
    at = r["eval_steps"]
    assert at[0] == 1 and at[-1] == r["steps"]["student"]
    for regime in ("offline", "online"):
        c = r["curves"][regime]
        assert [p["step"] for p in c] == at
        for p in c:
            assert p["proxy_kl"] >= 0 and p["golden_kl"] >= 0
            assert 0 <= p["proxy_tv"] <= 1 and 0 <= p["golden_tv"] <= 1
        s = r["summary"][regime]
        assert s["golden_final"] == c[-1]["golden_kl"]
        assert s["golden_min"] == min(p["golden_kl"] for p in c)
        assert r["hacking"][regime] == s["hacking"]
    assert r["holds"] == (r["hacking"]["offline"] and not r["hacking"]["online"])
    assert r["teacher_oracle_kl"] > 0  # the teacher is an imperfect proxy of the oracle


def test_kv_formula_matches_cache_for_gemma3_shapes():
    from geode.config import get_preset
    from geode.infer import kv_cache_bytes
    from geode.reproduce.local_global import cache_check, config_kv_bytes, kv_bytes

    c = get_preset("nano-1m")  # 5 local + 1 global, window 64
    for n in (1, 64, 65, 300):
        assert cache_check(c, n)["equal"], n
    big = get_preset("gemma3-27b")
    assert config_kv_bytes(big, 32_768) == kv_cache_bytes(big, 32_768)
    # by hand: 10 global layers x n + 52 local layers x 1024, 16 KV heads of 128, K and V, bf16
    assert config_kv_bytes(big, 32_768) == 2 * 16 * 128 * 2 * (10 * 32_768 + 52 * 1024)
    assert kv_bytes(10, 1, 5, 1, 8, 4, 4) == 2 * 8 * 4 * (1 * 10 + 5 * 4)


def test_analyse_power_law_and_hacking():
    from geode.reproduce.teacher_hacking import analyse, eval_steps

    steps = eval_steps(1000, 10)
    assert steps[0] == 1 and steps[-1] == 1000 and steps == sorted(set(steps))
    # a proxy following d = 2 s^-0.5 exactly: exponent -0.5, no departure; golden falling
    clean = [{"step": s, "proxy_kl": 2 * s**-0.5, "golden_kl": 3 * s**-0.3} for s in steps]
    a = analyse(clean)
    assert a["power_law"]["exponent"] == pytest.approx(-0.5)
    assert a["power_law"]["departure"] == pytest.approx(0.0, abs=1e-9)
    assert not a["hacking"] and a["golden_min_step"] == 1000
    # the proxy flattens late (above the law) while golden turns up after step 100: hacking
    hacked = [{"step": s, "proxy_kl": 2 * s**-0.5 + 0.01 * (1 - 1 / s),
               "golden_kl": 1.0 + 0.05 * abs(math.log(s / 100))} for s in steps]  # fmt: skip
    h = analyse(hacked)
    assert h["power_law"]["departure"] > 0.05
    assert h["golden_min_step"] == 100 and h["proxy_falling"]
    assert h["golden_rise"] == pytest.approx(0.05 * math.log(10)) and h["hacking"]


def test_unknown_name_and_bad_budget(tmp_path, capsys):
    with pytest.raises(ReproduceError, match="choose one of: teacher-hacking, local-global"):
        reproduce("nope", tmp_path / "x")
    with pytest.raises(ReproduceError, match="budget-minutes must be > 0"):
        reproduce("local-global", tmp_path / "y", budget_minutes=0)
    full = tmp_path / "full"
    full.mkdir()
    (full / "f").write_text("x")
    with pytest.raises(ReproduceError, match="not empty"):
        reproduce("local-global", full)
    assert main(["reproduce", "nope", "--out", str(tmp_path / "z")]) == 1
    err = capsys.readouterr().err
    assert "unknown claim 'nope'" in err and all(n in err for n in REGISTRY)
    assert not (tmp_path / "z").exists()
