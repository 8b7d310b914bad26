#!/usr/bin/env bash
# The main job until `fasp-edge run` lands: prune the embedded default model (SmolLM2-135M-Instruct)
# with FASP at 20% and compare its WikiText-2 perplexity with the dense model's.
# Uses ../shared/data when present (calibration on WikiText-2 VALIDATION, evaluation on TEST);
# elsewhere set CALIB_FILE and EVAL_FILE to text files of your own.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${FASP_EDGE_SHARED_DATA:-../shared/data}"
CALIB_FILE="${CALIB_FILE:-$DATA/wikitext2/wiki.valid.tokens}"
EVAL_FILE="${EVAL_FILE:-$DATA/wikitext2/wiki.test.joined.txt}"
WINDOWS="${WINDOWS:-16}"
NSAMPLES="${NSAMPLES:-128}"
for f in "$CALIB_FILE" "$EVAL_FILE"; do
    if [ ! -f "$f" ]; then
        echo "quickstart: $f not found; set CALIB_FILE (validation text) and EVAL_FILE (test text)" >&2
        exit 2
    fi
done
FE=.venv/bin/fasp-edge
$FE prune --sparsity 0.2 --calib-file "$CALIB_FILE" --nsamples "$NSAMPLES" --seqlen 512 --seed 0 \
    -o out/quickstart-fasp20 --overwrite
echo "dense:   $($FE --quiet eval --text-file "$EVAL_FILE" --seqlen 512 --max-windows "$WINDOWS")"
echo "FASP 20%: $($FE --quiet eval out/quickstart-fasp20 --text-file "$EVAL_FILE" --seqlen 512 --max-windows "$WINDOWS")"
