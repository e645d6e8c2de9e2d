#!/bin/bash
# Issue 22's first screen (docs/results/dynamic_parity_screen.md): each FWL variant and the baseline trained
# 500 steps at one seed on ../shared/corpus, then measured with `fwl eval --out` on validation documents 1-4
# and on documents of another kind (Debian's license texts). Run from the repository root with ../shared
# beside it; one run after another (about 3 hours on 2 CPU cores).
#   bash studies/dynamic_parity_screen.sh [OUT_DIR]
set -euo pipefail
out=${1:-runs/dynamic_parity_screen}
mkdir -p "$out"
common=("data.train=[../shared/corpus/train.jsonl.xz]" "data.valid=[../shared/corpus/valid.jsonl.xz]"
        "data.root=$out/corpus_data" train.steps=500 train.eval_every=500 train.save_every=500
        train.wandb.enabled=false model.tie_embeddings=false train.lr=3e-3)

licenses="$out/licenses.jsonl"
python3 studies/license_docs.py "$licenses"

train() {  # NAME CONFIG [overrides...]
    local name=$1 cfg=$2; shift 2
    [ -f "$out/$name/checkpoints/step_00000500/COMPLETE.json" ] || \
        fwl train "$cfg" "${common[@]}" "train.out_dir=$out/$name" "$@"
}

ruler() {  # NAME METHODS [eval args...]
    local name=$1 methods=$2; shift 2
    fwl eval "$out/$name/config.yaml" "$out/$name" --out "$out/eval_${name}_valid" --methods "$methods" \
        --max-tokens 8192 "$@"
    fwl eval "$out/$name/config.yaml" "$out/$name" --out "$out/eval_${name}_licenses" --methods "$methods" \
        --docs "$licenses" "$@"
}

train base configs/base_tiny.yaml
ruler base plain,unigram_cache,continuous_cache,dynamic
ruler base dynamic --dynamic-segment 64
train fwl configs/tiny.yaml
ruler fwl slow_head,fwl_reset,fwl_carried,continuous_cache,dynamic
train fwl_sqrt configs/tiny.yaml model.fwl.normalize=sqrt
ruler fwl_sqrt slow_head,fwl_reset,fwl_carried,continuous_cache
train fwl_unembedding configs/tiny.yaml "model.fwl.fast_set=[head,out_bias,unembedding]"
ruler fwl_unembedding slow_head,fwl_reset,fwl_carried,continuous_cache
train fwl_token configs/tiny.yaml model.fwl.step_size=token
ruler fwl_token slow_head,fwl_reset,fwl_carried,continuous_cache
train fwl_sequential64 configs/tiny.yaml model.fwl.update=sequential model.fwl.inner_chunk=64
ruler fwl_sequential64 slow_head,fwl_reset,fwl_carried,continuous_cache
