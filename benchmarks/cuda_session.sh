#!/usr/bin/env bash
# The CUDA checks, in one pass on a GPU machine (about 5 minutes on one H100):
#   1. tests/test_cuda.py: bf16 / fp16 training with channels-last images, CUDA = CPU for training, beam search
#      and feature extraction in fp32, checkpoints written on the GPU read on the CPU;
#   2. short tools/train.py runs under bf16, fp16 and fp32: configs/demo.yaml (cached EfficientNet-Lite0
#      features) and the reference model of configs/show_attend_tell_flickr8k.yaml (inception_v3 at 299 px,
#      fine-tuned end to end, random init) on `shapes` images, timed (train_summary.json, metrics.jsonl);
#   3. the decoder-training, decoding, key/value-cache and full training-step benchmarks on CUDA
#      (benchmarks/results/*_cuda.json).
# Scores use sacrebleu only: pycocoevalcap's tokenizer needs Java, which GPU images often lack.
#   OUT=DIR bash benchmarks/cuda_session.sh [tests] [bench] [train]   (default: all three, in that order;
#   summary, logs and benchmark JSON in DIR, runs in $RUNS; BENCHES and AMPS choose benchmarks and precisions)
set -uo pipefail
OUT=${OUT:-runs/cuda_session}
RUNS=${RUNS:-/tmp/capkit_cuda_runs}
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 CAPKIT_CACHE=$RUNS/cache
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"

DEADLINE=${DEADLINE:-470}  # seconds for all steps: each step's limit is cut to what is left, the summary always runs
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $RUNS/NAME.log, record rc and wall time
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    ((limit > DEADLINE - SECONDS)) && limit=$((DEADLINE - SECONDS))
    if ((limit < 20)); then echo "$name skipped: out of time" | tee -a "$OUT/steps.txt"; return; fi
    timeout "$limit" "$@" >"$RUNS/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/steps.txt"
    [ "$rc" = 0 ] || tail -n 15 "$RUNS/$name.log"
}

STEPS=${*:-tests bench train}
BENCHES=${BENCHES:-decoder_train decoding kv_cache train_step}
AMPS=${AMPS:-bf16 fp16 none}
wants() { [[ " $STEPS " == *" $1 "* ]]; }

if wants tests; then
    step pytest_cuda 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_engine.py
    cp "$RUNS/pytest_cuda.log" "$OUT/"
fi

if wants bench; then
    # shellcheck disable=SC2086  # BENCHES is a list of names
    step benchmarks 240 python3 -m benchmarks $BENCHES
    grep -v "^wrote" "$RUNS/benchmarks.log" | tail -n 40
    cp benchmarks/results/*_cuda.json "$OUT/"
fi

SCORE=(eval.metrics=[sacrebleu] train.early_stop_metric=sacrebleu train.device=cuda train.output_dir="$RUNS")
reference() {  # the reference model, fine-tuned end to end on 1280 `shapes` images (100 steps of 64 captions)
    step "reference_$1" 90 python3 tools/train.py configs/show_attend_tell_flickr8k.yaml "${SCORE[@]}" \
        train.amp="$1" train.run_name="reference_$1" train.epochs=1 \
        model.encoder.pretrained=false model.encoder.finetune=all data.num_workers=12 data.dataset.name=shapes \
        data.dataset.num_train=1280 data.dataset.num_val=64 data.dataset.num_test=64 data.vocab_min_count=1
}
demo() {
    step "demo_$1" 90 python3 tools/train.py configs/demo.yaml "${SCORE[@]}" train.amp="$1" train.run_name="demo_$1" \
        data.num_workers=4
}
if wants train; then
    for amp in $AMPS; do reference "$amp"; done
    for amp in $AMPS; do demo "$amp"; done
fi

python3 - "$RUNS" "$OUT" <<'EOF'
"""Summarise the training runs: wall time, steps, median captions/s, final loss and test sacrebleu."""
import json, statistics, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for run in sorted(p for p in runs.iterdir() if (p / "train_summary.json").is_file()):
    summary = json.loads((run / "train_summary.json").read_text())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "captions_s" in x]
    test = run / "test_metrics.json"
    rows.append({"run": run.name, **summary,
                 "captions_s_median": statistics.median(x["captions_s"] for x in steps[1:] or steps) if steps else None,
                 "last_loss": steps[-1]["loss"] if steps else None,
                 "test": json.loads(test.read_text()) if test.is_file() else None})
(out / "cuda_runs.json").write_text(json.dumps(rows, indent=1))
print(f"{'run':<16}{'train s':>9}{'steps':>7}{'captions/s':>12}{'last loss':>11}{'test sacrebleu':>16}")
for r in rows:
    bleu = (r["test"] or {}).get("sacrebleu")
    print(f"{r['run']:<16}{r['train_seconds']:>9.1f}{r['global_step']:>7}{r['captions_s_median'] or 0:>12.1f}"
          f"{r['last_loss'] or float('nan'):>11.3f}{bleu if bleu is not None else float('nan'):>16.2f}")
EOF
tar -czf "$OUT/logs.tar.gz" -C "$RUNS" --exclude=cache --exclude='*.safetensors' --exclude='*.npy' --exclude=tensorboard .
cat "$OUT/steps.txt"
