"""lm-evaluation-harness end to end against /v1/completions (local-completions, tokenized).

`lm-eval[api]` is in the dev extra, so `make test` installs it into the venv (its console
script next to this Python); `GEODE_LM_EVAL` names another `lm_eval` executable. Outside CI a
missing lm_eval skips the test with the reason; with `CI=true` it fails. It runs offline (the
task YAMLs read local JSONL files; the hub is switched off) a multiple-choice (loglikelihood)
task and a generation task, and checks that lm-eval's loglikelihoods equal the engine's.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from geode.infer import Engine, Request


def _lm_eval() -> str | None:
    """$GEODE_LM_EVAL, the venv's console script (PATH need not include the venv), or PATH."""
    if os.environ.get("GEODE_LM_EVAL"):
        return os.environ["GEODE_LM_EVAL"]
    beside = Path(sys.executable).parent / "lm_eval"
    return str(beside) if beside.is_file() else shutil.which("lm_eval")


MC_YAML = """task: geode_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN_YAML = """task: geode_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_local_completions(server, tmp_path: Path):
    lm_eval = _lm_eval()
    if lm_eval is None:
        reason = "lm_eval not found: pip install -e '.[dev]' (make test does), or set GEODE_LM_EVAL"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: this test must run)")
        pytest.skip(reason)
    words = ["fox", "dog", "cat", "hello"]
    mc = [
        {
            "question": f"the quick brown {w}",
            "choices": [" fox", " dog", " jumps over"],
            "answer": i % 3,
        }
        for i, w in enumerate(words)
    ]
    gen = [{"question": f"hello {w}", "answer": "world"} for w in ("world", "json", "the")]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in mc))
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(x) + "\n" for x in gen))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "geode_mc.yaml").write_text(MC_YAML.format(data=tmp_path / "mc.jsonl"))
    (tasks / "geode_gen.yaml").write_text(GEN_YAML.format(data=tmp_path / "gen.jsonl"))
    out = tmp_path / "out"
    args = (
        f"model=tiny,base_url={server.url}/v1/completions,tokenized_requests=True,"
        "tokenizer_backend=remote,num_concurrent=4,max_retries=1"
    )
    env = dict(
        os.environ,
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_DATASETS_CACHE=str(tmp_path / "hf"),
    )
    proc = subprocess.run(
        [
            lm_eval,
            "run",
            "--model",
            "local-completions",
            "--tasks",
            "geode_mc",
            "geode_gen",
            "--include_path",
            str(tasks),
            "--model_args",
            args,
            "--output_path",
            str(out),
            "--log_samples",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(Path(glob.glob(f"{out}/**/results_*.json", recursive=True)[0]).read_text())
    assert results["results"]["geode_mc"]["sample_len"] == 4
    assert results["results"]["geode_gen"]["sample_len"] == 3

    # lm-eval's loglikelihoods equal the engine's prompt logprobs of the same tokens
    tok = server.state.tokenizer
    engine = Engine(server.state.engine.model, tok)
    (samples,) = glob.glob(f"{out}/**/samples_geode_mc_*.jsonl", recursive=True)
    checked = 0
    for line in Path(samples).read_text().splitlines():
        doc = json.loads(line)
        for k, resp in enumerate(doc["resps"]):
            ctx = doc["arguments"][f"gen_args_{k}"]["arg_0"]
            cont = doc["arguments"][f"gen_args_{k}"]["arg_1"]
            n_sp = len(ctx) - len(ctx.rstrip())  # lm-eval moves trailing spaces to the continuation
            if n_sp:
                ctx, cont = ctx[:-n_sp], ctx[-n_sp:] + cont
            whole, ctx_ids = tok.encode(ctx + cont), tok.encode(ctx)
            r = engine.generate(Request(whole, max_new_tokens=1, temperature=0, prompt_logprobs=0))
            want = sum(r[0].prompt_logprobs[len(ctx_ids) :])
            assert abs(float(resp[0][0]) - want) < 1e-3, (ctx, cont)
            checked += 1
    assert checked == 12
