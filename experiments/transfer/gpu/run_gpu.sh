#!/usr/bin/env bash
# The transfer study at the paper's scale on one GPU (GPU.md beside this file). Run from the repository root.
#
#   here, once:      bash experiments/transfer/gpu/run_gpu.sh prepare      # data, wheels and model parts in .gpu/
#   on the device:   bash experiments/transfer/gpu/run_gpu.sh receive N    # one call per .gpu/callN (carry it)
#                    bash experiments/transfer/gpu/run_gpu.sh run          # both arms x 4 seeds; report into $OUT
#   here, a dry run: bash experiments/transfer/gpu/run_gpu.sh dry          # all of it on the CPU, --quick sizes
#
# What the device keeps between calls lives in $GPU_DIR (default /tmp/midalign_gpu): it lasts while the machine stays
# warm (30 s after a call), so the calls must follow one another at once.
set -euo pipefail
HERE=experiments/transfer
SEEDS=${SEEDS:-4}
JOBS=${JOBS:-8}
LIMIT_S=${LIMIT_S:-510}  # the driver's share of a 9-minute call (the rest: starting, copying the report back)
if [ "${DRY:-0}" = 1 ]; then  # the CPU dry run: the same steps at --quick sizes (a tiny model, 32 rows, 2 seeds)
    GPU_DIR=${GPU_DIR:-/tmp/midalign_gpu_dry}
    DATA_FLAGS=(--task classification --quick)
    RUN_FLAGS=(--device cpu --jobs 2)
else
    GPU_DIR=${GPU_DIR:-/tmp/midalign_gpu}
    # The paper's scale: every English train row of the help (about 11.3k at 200 characters, cut to whole steps),
    # batch 32 x accumulation 4, 2 epochs, one pair per task row (32 pairs per alignment micro-batch), 256 test rows
    DATA_FLAGS=(--task classification --seeds "$SEEDS" --train_rows 12288 --epochs 2 --batch_size 32
        --gradient_accumulation_steps 4 --align_batch_size 32 --max_chars 200 --dev_rows 256 --max_eval 256
        --probe_pairs 64)
    RUN_FLAGS=(--model "$GPU_DIR/gemma-3-270m" --device cuda --bf16 --jobs "$JOBS")
fi
OUT=${OUT:-$GPU_DIR/returned}
OUTPUT_DIR=$GPU_DIR/out
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$GPU_DIR/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the carried wheels first, then this repository

case "${1:-}" in
prepare)  # here: the task data (needs the help packages), then the call folders .gpu/callN
    rm -rf .gpu_data && mkdir -p .gpu_data
    python "$HERE/transfer.py" "${DATA_FLAGS[@]}" --output_dir .gpu_data/out --data_only
    python "$HERE/gpu/prepare.py" --data .gpu_data/out/data "${@:2}"
    ;;
receive)  # the device, call N: keep the part and the data, install the wheels, assemble and convert once complete
    n=${2:?receive needs the call number}
    python3 "$HERE/gpu/receive.py" ".gpu/call$n" "$GPU_DIR" out
    if [ -d ".gpu/call$n/wheels" ] && [ -n "$(ls ".gpu/call$n/wheels")" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$GPU_DIR/site" \
            ".gpu/call$n"/wheels/*.whl
    fi
    if [ -f "$GPU_DIR/gemma-3-270m.gguf" ] && [ ! -f "$GPU_DIR/gemma-3-270m/config.json" ]; then
        python3 - "$GPU_DIR" <<'PY'
import sys
import torch
from trl_midalign.modeling import load_causal_lm, load_tokenizer

root = sys.argv[1]
gguf = f"{root}/gemma-3-270m.gguf"
model, tokenizer = load_causal_lm(gguf, dtype=torch.float32), load_tokenizer(gguf)
model.save_pretrained(f"{root}/gemma-3-270m")
tokenizer.save_pretrained(f"{root}/gemma-3-270m")
print(f"[receive] converted: {sum(p.numel() for p in model.parameters()):,} parameters in {root}/gemma-3-270m")
PY
    fi
    ;;
run)  # the device: both arms x $SEEDS seeds (resumes from runs.jsonl when called again)
    if [ "${DRY:-0}" != 1 ]; then
        python3 -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.cuda.get_device_name())"
    fi
    mkdir -p "$OUT"
    status=0
    timeout "$LIMIT_S" python3 "$HERE/transfer.py" "${DATA_FLAGS[@]}" "${RUN_FLAGS[@]}" --output_dir "$OUTPUT_DIR" \
        "${@:2}" > "$OUT/driver.log" 2>&1 || status=$?
    tail -n 40 "$OUT/driver.log"
    for f in runs.jsonl transfer.json transfer.md transfer.png settings.json data/data.json; do
        if [ -f "$OUTPUT_DIR/$f" ]; then cp "$OUTPUT_DIR/$f" "$OUT/"; fi
    done
    echo "[run] driver exit status $status (124: stopped at $LIMIT_S s; run again on the warm machine to resume)"
    exit "$status"
    ;;
dry)  # here, on the CPU: prepare (no wheels), every receive, run
    export DRY=1
    bash "$0" prepare --no_wheels
    for folder in .gpu/call*; do bash "$0" receive "${folder#.gpu/call}"; done
    bash "$0" run
    ;;
*)
    echo "usage: $0 prepare | receive N | run [driver flags] | dry" >&2
    exit 2
    ;;
esac
