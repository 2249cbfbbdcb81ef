#!/usr/bin/env bash
# GPU check of the analysis engine: one shot on a CUDA machine, about 6 minutes, installs nothing.
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh --quick   # CPU dry run (tiny N, 64 px)
#
# Needs python3 with torch, torchvision, torchmetrics, pytorch_lightning, scipy, h5py, numpy
# (no SALib, wandb or jsonargparse: nothing on this path imports them). Steps, each with its own
# time limit, a failure logged and the next step run anyway:
#   1. environment and import check (the engine path must not load SALib / wandb / jsonargparse)
#   2. the CUDA tests: the augmentations, and the float32 partial sums of the accumulators
#      against float64 ones within their derived bound (pytest -m gpu)
#   3. bench/bench_augmentations.py --device cuda (needs scikit-learn's sample photos)
#   4. bench/bench_engine.py: ResNet18 at 224 px, Sobol' N = 2^12, sets 1 and 2, reduction none
#      at the published checkpoints: rows/s against bare forward passes, breakdown, the time
#      extrapolated to the published 2.4 M-row design, variants baseline (float32), fast (bf16 +
#      channels-last + deduplication) and fp16, within a deadline
#   5. bench/bench_engine.py: AlexNet at 224 px, all 8 published layers, second order, N = 512
#      (9,216 rows), float32: the accumulation's heaviest case against its bare forward passes;
#      again with --background on (the sums and augmentation in a thread on the caller's stream)
#   6. bench/bench_masking.py: guided masking against the bare masked forwards of its schedule
#      (batched configurations at the GPU default of 256 rows per forward, and unbatched)
#   7. a compact summary of the JSON written
# Results and logs go to $OUT when set (the device tool collects it), else bench/results.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
START=$(date +%s)
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1

if [ "$QUICK" = 1 ]; then
    DEVICE=cpu; SIZE=64; N=8; TOTAL=300; THREADS=1; WORKERS=2
    AUG_ARGS=(--device cpu --batch 4 --size 64 --repeats 1)
else
    DEVICE=cuda; SIZE=224; N=4096; TOTAL=330; THREADS=4; WORKERS=4
    AUG_ARGS=(--device cuda)
fi

log() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$LOG"; }
step() {  # step <name> <seconds> <command...>: run with a time limit, log output and status
    local name=$1 limit=$2; shift 2
    log "== $name (limit ${limit} s): $*"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local status=$?
    log "== $name: exit status $status"
    return 0
}

: >"$LOG"
log "gpu_check: device $DEVICE, $SIZE px, N = $N, python $PY, out $OUT_DIR"
step environment 60 "$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version())
for name in ("torch", "torchvision", "torchmetrics", "pytorch_lightning", "numpy", "scipy",
             "h5py", "sklearn", "pytest", "SALib", "wandb", "jsonargparse"):
    try:
        module = importlib.import_module(name)
        print(f"{name:18} {getattr(module, '__version__', '?')}")
    except Exception as error:  # report, never fail
        print(f"{name:18} missing ({type(error).__name__})")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
# A fresh interpreter: what the engine benchmark imports must not pull in the optional packages.
step imports 60 "$PY" - <<'EOF'
import sys
sys.path.insert(0, "bench")
import bench_engine  # noqa: F401  (common, data, lightning_modules, sensitivity.engine)
import sensitivity.gsa, sensitivity.store  # noqa: E401,F401
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"SALib", "wandb", "jsonargparse"})
print("optional packages loaded by the engine path:", loaded or "none")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm \
    --format=csv >>"$LOG" 2>&1

if "$PY" -c "import pytest" 2>/dev/null; then
    step cuda-test 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_augmentations.py \
        tests/test_partial_sums.py -m gpu
else
    log "pytest missing: CUDA augmentation test skipped"
fi
step augmentations 90 "$PY" bench/bench_augmentations.py "${AUG_ARGS[@]}" \
    --output "$OUT_DIR/augmentations_$DEVICE.json"

ELAPSED=$(( $(date +%s) - START ))
DEADLINE=$(( TOTAL - ELAPSED ))
[ "$DEADLINE" -lt 60 ] && DEADLINE=60
step engine $(( DEADLINE + 60 )) "$PY" bench/bench_engine.py --device "$DEVICE" --size "$SIZE" \
    --archs resnet18 --sets 1,2 --n "$N" --reps 1 --variants baseline,fast,fp16 --workers "$WORKERS" \
    --threads "$THREADS" --deadline "$DEADLINE" --out "$OUT_DIR" \
    --name "engine_efficiency_${DEVICE}_${SIZE}.json"

if [ "$QUICK" = 1 ]; then S2_N=8; else S2_N=512; fi
step engine-second-order 150 "$PY" bench/bench_engine.py --device "$DEVICE" --size "$SIZE" \
    --archs alexnet --sets 1 --n "$S2_N" --reps 1 --variants baseline --second-order \
    --workers "$WORKERS" --threads "$THREADS" --out "$OUT_DIR" \
    --name "engine_second_order_${DEVICE}_${SIZE}.json"
step engine-second-order-background 150 "$PY" bench/bench_engine.py --device "$DEVICE" \
    --size "$SIZE" --archs alexnet --sets 1 --n "$S2_N" --reps 1 --variants baseline \
    --second-order --background on --workers "$WORKERS" --threads "$THREADS" --out "$OUT_DIR" \
    --name "engine_second_order_background_${DEVICE}_${SIZE}.json"

if [ "$QUICK" = 1 ]; then MASK_ARGS=(--images-per-class 1 --k 1 --reps 1); else
    MASK_ARGS=(--images-per-class 4 --k 4); fi
step masking 120 "$PY" bench/bench_masking.py --device "$DEVICE" --no-processes \
    "${MASK_ARGS[@]}" --batch-rows auto 0 --out "$OUT_DIR"

log "== summary"
"$PY" - "$OUT_DIR" "$DEVICE" "$SIZE" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
out, device, size = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
aug = out / f"augmentations_{device}.json"
if aug.exists():
    a = json.loads(aug.read_text())
    print(f"augmentations: apply {a['batched_images_per_s']:.0f} images/s ({a['ratio']:.1f}x), "
          f"augment {a['composed_images_per_s']:.0f} ({a['ratio_composed']:.1f}x), random order "
          f"{a['composed_random_order_images_per_s']:.0f} "
          f"({a['ratio_composed_random_order']:.1f}x), per-sample "
          f"{a['per_sample_images_per_s']:.0f}, max diff {a['max_abs_diff']:.1e}")
else:
    print("augmentations: no result")
eng = out / f"engine_efficiency_{device}_{size}.json"
if not eng.exists():
    print("engine: no result"); sys.exit(0)
e = json.loads(eng.read_text())
m = e["machine"]
print(f"engine: {m['device_name']}, torch {m['torch']}, N = {e['settings']['n']}, "
      f"{size} px, ResNet18, reduction none, default checkpoints")
print(f"{'set':>3} {'variant':9} {'rows':>6} {'fwd%':>5} {'analysis r/s':>12} {'bare r/s':>9} "
      f"{'ratio':>6} {'steady':>6} {'2.4M rows h':>11} {'GPU MB':>7}")
for r in e["runs"]:
    steady = f"{r['steady_ratio']:.2f}" if r["steady_ratio"] else "-"
    print(f"{r['set']:>3} {r['variant']:9} {r['rows']:>6} {100 * r['forwarded'] / r['rows']:>5.0f} "
          f"{r['analysis_rows_per_s']:>12.0f} {r['bare_rows_per_s']:>9.0f} {r['ratio']:>6.2f} "
          f"{steady:>6} {r['extrapolation']['published_2.4M_rows_hours']:>11.2f} "
          f"{(r['cuda_peak_mb'] or 0):>7.0f}")
    b = r["breakdown_seconds"]
    print("      breakdown s: " + ", ".join(f"{k} {b[k]:.2f}" for k in
          ("setup", "data", "augment", "forward", "accumulate", "compute") if k in b))
    d = r.get("index_difference_vs_baseline")
    if d:
        print("      vs float32 (clipped): " + "; ".join(
            f"{k} max {d[k]['max_abs_diff_clipped']:.2e} mean {d[k]['mean_abs_diff_clipped']:.2e}"
            f" beyond half-width {d[k]['fraction_beyond_half_width']:.4f}" for k in ("S1", "ST")))
for s in e.get("skipped", []):
    print(f"skipped: set {s['set']} {s['variant']} (expected {s['expected_seconds']:.0f} s)")
base = [r for r in e["runs"] if r["variant"] == "baseline" and r["set"] == 1]
if base:
    r = base[0]
    print(f"targets: ratio >= 0.8: {r['ratio']:.2f}; published 2.4 M rows < 0.5 h: "
          f"{r['extrapolation']['published_2.4M_rows_hours']:.2f} h (float32)")
for name, how in (("", ""), ("_background", ", background thread")):
    second = out / f"engine_second_order{name}_{device}_{size}.json"
    for r in (json.loads(second.read_text())["runs"] if second.exists() else []):
        print(f"AlexNet second order{how}, N = {r['n']} ({r['rows']} rows, {r['units']} "
              f"units): {r['analysis_rows_per_s']:.0f} rows/s, bare {r['bare_rows_per_s']:.0f},"
              f" ratio {r['ratio']:.2f} (target >= 0.85)")
masking = out / "masking.json"
for r in (json.loads(masking.read_text())["efficiency"] if masking.exists() else []):
    print(f"masking, batch_rows {r['batch_rows']}: {r['forwards']} forwards, evaluation "
          f"{r['evaluation_s']:.1f} s vs bare masked forwards {r['bare_s']:.1f} s: ratio "
          f"{r['ratio']:.2f} (target >= 0.7)")
EOF
log "gpu_check done in $(( $(date +%s) - START )) s; results in $OUT_DIR"
