#!/bin/sh
# `make demo` until the quickstart issue lands (`geode quickstart`: data -> teacher -> student ->
# SFT -> RL -> eval -> REPORT.md). What exists today, end to end, with nothing downloaded: a
# tokenizer trained on this machine's Python standard library, a nano-5m checkpoint with RANDOM
# weights saved in the Hugging Face layout, reloaded by `geode info` and `geode generate`.
# Then it says what was built, why the text is gibberish, and what to run next.
#
#   sh scripts/demo.sh [OUT]        (OUT defaults to demo_out; GEODE=path/to/geode overrides)
set -eu

OUT=${1:-demo_out}
GEODE=${GEODE:-.venv/bin/geode}
PROMPT="def main("

step() { printf '\n== %s\n' "$*"; }

step "1/4 tokenizer: SentencePiece, 4096 pieces, trained on 8 MB of this machine's Python stdlib"
"$GEODE" tokenizer train --stdlib --stdlib-mb 8 --vocab-size 4096 --out "$OUT/tokenizer.model"

step "2/4 model: the nano-5m preset with RANDOM (untrained) weights, Hugging Face layout"
"$GEODE" init nano-5m "$OUT/nano-5m" --seed 0 --tokenizer "$OUT/tokenizer.model"

step "3/4 geode info: parameters and KV-cache memory, read back from config.json"
"$GEODE" info "$OUT/nano-5m"

step "4/4 geode generate: reloads the checkpoint, 16 tokens greedily after \"$PROMPT\""
"$GEODE" generate "$OUT/nano-5m" --prompt "$PROMPT" --max-new-tokens 16 --temperature 0

cat <<EOF

== What was built
  $OUT/tokenizer.model   SentencePiece tokenizer (4096 pieces) trained on the Python stdlib
  $OUT/nano-5m/          nano-5m checkpoint: config.json, model.safetensors, tokenizer.model
                         (transformers, vLLM and geode load it)

The generated text above is gibberish on purpose: the model's weights are random; nothing was
trained. The full demo (pretraining, distillation, SFT, RL, evaluation, REPORT.md, in about
15 minutes on 2 CPU cores) replaces this script when the quickstart issue lands.

== Next
  Sample more (still random):  $GEODE generate $OUT/nano-5m --prompt 'import ' --stream --temperature 0.8
  A 4-bit copy:                $GEODE quantize $OUT/nano-5m $OUT/nano-5m-int4 --int4
  Serve it (API + chat page):  $GEODE serve $OUT/nano-5m
  A model that learns (a few minutes on 2 cores; docs/data.md, docs/training.md):
    $GEODE data prepare recipes/data/quickstart.toml --tokenizer $OUT/tokenizer.model --out $OUT/data
    $GEODE train recipes/train/nano.toml --out $OUT/run --set data.path=$OUT/data --set model.overrides.vocab_size=4096 --set 'data.eval_source=""'
    $GEODE generate $OUT/run/model --prompt 'def main(' --temperature 0
EOF
