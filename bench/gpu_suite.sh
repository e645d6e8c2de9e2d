#!/usr/bin/env bash
# Every benchmark on one machine, into one results file (issue 14 item 5).
#
#   bench/gpu_suite.sh                          # CUDA: bf16, NCCL; writes bench/results/gpu_suite_<host>_<date>.md
#   bench/gpu_suite.sh --out results.md
#   bench/gpu_suite.sh --device cpu --smoke     # the script's logic on CPU at tiny shapes (tests/test_gpu_suite.py)
#
# Sections (each a heading, the command that made it and its output; a benchmark that fails is marked
# FAILED with the end of its output and the others still run; exit status 1 if any failed):
#   machine      GPUs, driver, torch, CUDA, NCCL, load average
#   train_step   MFU at the fwl_125m and fwl_1b shapes on one GPU (T = 2048), FWL vs baseline step and its
#                ratio to the analytic FLOP ratio, compiled (train.compile, Inductor) vs eager — bench_train_step.py
#   attention    document-masked attention on packed documents: the dense [B, 1, T, T] mask vs FlexAttention's
#                block mask (model.attention), the same two shapes — bench_train_step.py --attention
#   fwl_op       the FWL operator, chunked vs quadratic form: time and memory over T — bench_fwl_op.py
#   parallel     tp / SP / ZeRO-1/3 / pp step time and collective bytes on 2 ranks (NCCL: 2 GPUs) — bench_parallel.py
#   cp           context parallelism, state vs key/value exchange on 2 ranks (NCCL: 2 GPUs) — bench_cp.py
# On one GPU the two-rank sections say they were skipped and why. --smoke runs every section at tiny shapes,
# with torch.compile's `eager` backend (graph capture without code generation) so that it takes a minute:
# it checks the plumbing, its figures mean nothing (on CPU the attention section's `auto` rows run dense too:
# FlexAttention has no backward there).
set -u -o pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }

DEVICE=cuda
SMOKE=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="${2:-}"; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        --out) OUT="${2:-}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in
    cuda|cpu) ;;
    *) echo "gpu_suite.sh: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${FWL_PYTHON:-python}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DEVICE" = cuda ]; then
    NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
    if [ "$NGPU" -lt 1 ]; then
        echo "gpu_suite.sh: --device cuda but torch sees no CUDA device (use --device cpu --smoke to check the script)" >&2
        exit 2
    fi
else
    NGPU=0
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
[ -n "$OUT" ] || OUT="$REPO/bench/results/gpu_suite_$(hostname -s)_$(date -u +%Y%m%dT%H%MZ).md"
mkdir -p "$(dirname "$OUT")"
# Written under another name and moved into place at the end: a results file is always complete.
PARTIAL="$OUT.partial"
: > "$PARTIAL"
FAILED=()

section() {  # section NAME DESCRIPTION COMMAND...
    local name="$1" what="$2"; shift 2
    local log rc start
    log="$(mktemp)"
    start=$(date +%s)
    echo "gpu_suite: $name ..." >&2
    (cd "$REPO" && "$@") > "$log" 2>&1
    rc=$?
    {
        echo "## $name"
        echo
        echo "$what"
        echo
        echo "command: \`$*\`"
        echo "load average before/after: $LOAD_BEFORE / $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a); wall $(( $(date +%s) - start )) s"
        echo
        if [ $rc -eq 0 ]; then
            echo '```'
            grep -v -e 'real_accelerator' -e 'Warning' -e 'warnings.warn' "$log"
            echo '```'
        else
            FAILED+=("$name")
            echo "FAILED (exit status $rc); the end of its output:"
            echo
            echo '```'
            tail -n 40 "$log"
            echo '```'
        fi
        echo
    } >> "$PARTIAL"
    rm -f "$log"
}

skipped() {  # skipped NAME WHY
    printf '## %s\n\nskipped: %s\n\n' "$1" "$2" >> "$PARTIAL"
}

LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)"
{
    echo "# fwl_scale benchmark suite"
    echo
    echo "device: $DEVICE; mode: $([ $SMOKE = 1 ] && echo 'smoke (tiny shapes, compile backend eager: the figures mean nothing)' || echo full)"
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ); host: $(hostname -s); commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo n/a)"
    echo
} >> "$PARTIAL"

machine() {
    "$PYTHON" - <<'EOF'
import os, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{os.cpu_count()} CPU cores, load average {os.getloadavg()}")
if torch.cuda.is_available():
    print(f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
else:
    print(f"no CUDA device; CPU: {platform.processor() or platform.machine()}")
EOF
    if command -v nvidia-smi > /dev/null && [ "$NGPU" -gt 0 ]; then nvidia-smi; fi
}
section machine "The machine." machine

if [ $SMOKE = 1 ]; then
    TINY=(--set model.n_layers=1 model.d_model=32 model.n_heads=2 model.vocab_size=256 model.fwl.chunk_size=16
          model.fwl.vocab_chunk=64)
    section train_step "FWL vs baseline step, eager vs compiled, MFU (smoke: tiny shapes)." \
        "$PYTHON" bench/bench_train_step.py --device "$DEVICE" --shapes 125m,1b --seq 32 --micro 2 --warmup 1 \
        --steps 1 --compile both --compile-backend eager "${TINY[@]}"
    section attention "Document-masked attention, dense mask vs model.attention=auto (smoke: T = 128)." \
        "$PYTHON" bench/bench_train_step.py --device "$DEVICE" --shapes 125m --seq 128 --micro 2 --warmup 1 \
        --steps 1 --attention dense,auto --doc-len 32 "${TINY[@]}"
    section fwl_op "FWL operator, chunked vs quadratic (smoke)." \
        "$PYTHON" bench/bench_fwl_op.py --device "$DEVICE" --width 16 --vocab 64 --chunk 16 --lengths 32,64 --reps 1
    section parallel "Layouts on 2 ranks, gloo (smoke)." \
        "$PYTHON" bench/bench_parallel.py --steps 1 --d 64 --layers 2 --seq 16
    section cp "Context parallelism on 2 ranks, gloo (smoke)." \
        "$PYTHON" bench/bench_cp.py --width 16 --vocab 64 --chunk 8 --lengths 16 --reps 1
else
    section train_step "MFU at the fwl_125m and fwl_1b shapes on one GPU (T = 2048, bf16, ZeRO 0, AdamW, \
activation checkpointing as in their configs), FWL vs baseline step against the analytic FLOP ratio \
(target: measured / analytic <= 1.1), compiled (Inductor) vs eager." \
        "$PYTHON" bench/bench_train_step.py --device cuda --bf16 --shapes 125m,1b --seq 2048 --micro 125m=8 1b=4 \
        --warmup 3 --steps 10 --compile both --set train.activation_checkpointing=true \
        --json "${OUT%.md}.train_step.json"
    section attention "Document-masked attention on rows packed with documents of mean length 512 (T = 2048): the \
dense [B, 1, T, T] mask (SDPA's memory-efficient kernel with a dense bias) vs FlexAttention's block mask built from \
the document ids (model.attention=flex), FWL and baseline at the fwl_125m and fwl_1b shapes, bf16, eager and \
compiled (Inductor)." \
        "$PYTHON" bench/bench_train_step.py --device cuda --bf16 --shapes 125m,1b --seq 2048 --micro 125m=8 1b=4 \
        --warmup 3 --steps 10 --compile both --attention dense,flex --doc-len 512 \
        --set train.activation_checkpointing=true --json "${OUT%.md}.attention.json"
    section fwl_op "FWL operator, chunked vs quadratic form, d = s = 1024, bf16: time and memory (saved for backward, \
peak allocated) over T." \
        "$PYTHON" bench/bench_fwl_op.py --device cuda --dtype bfloat16 --width 1024 --vocab 50304 --chunk 512 \
        --lengths 1024,2048,4096,8192,16384 --reps 3
    if [ "$NGPU" -ge 2 ]; then
        section parallel "Layouts on 2 GPUs over NCCL: step time and bytes per collective against the analytic figures \
(fp32, which the analytic bytes assume)." \
            "$PYTHON" bench/bench_parallel.py --device cuda --steps 5 --d 1024 --layers 8 --seq 2048
        section cp "Context parallelism over 2 GPUs (NCCL): state vs key/value exchange." \
            "$PYTHON" bench/bench_cp.py --device cuda --width 1024 --vocab 50304 --chunk 512 \
            --lengths 1024,4096,16384 --reps 3
    else
        skipped parallel "needs 2 GPUs for 2 NCCL ranks, found $NGPU"
        skipped cp "needs 2 GPUs for 2 NCCL ranks, found $NGPU"
    fi
fi

if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'failed sections: %s\n' "${FAILED[*]}" >> "$PARTIAL"
fi
mv "$PARTIAL" "$OUT"
echo "gpu_suite: results in $OUT" >&2
[ ${#FAILED[@]} -eq 0 ]
