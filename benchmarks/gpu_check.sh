#!/usr/bin/env bash
# The GPU checks of issues 3 and 7 as one prepared script, for a machine lent by the `device` tool (or any CUDA box).
#
#   0. the CUDA-only tests (tests/training: resuming a training run on the GPU);
#   1. determinism: process.py twice on every container case on the GPU; the reruns must be byte-identical
#      (runtime.deterministic, the default);
#   2. CPU agreement: each GPU output against the CPU-made expected output, with midog.compare's documented
#      tolerance (1e-3 on probabilities, 2 µm on points, equal classes); then, for information only, a run with
#      proposals.half=true (fp16 detector) against the same at 0.1 (measured: 0.057 off); the GPU outputs come
#      back in gpu-outputs.tar.gz;
#   3. speed: benchmarks/gpu_modes.py (the issue's target models, random YOLO11x + ConvNeXt-Tiny verifier and
#      atypical classifier, timing only, in each runtime mode), then benchmarks/bench_track1.py --device cuda with
#      the shipped weights (matched_sahi is only meaningful with trained weights: a random YOLO11x's boxes move
#      with the batch size alone, see docs/track1.md).
#
#   bash benchmarks/gpu_check.sh [quick]      # quick: steps 1 and 2 only
#
# Logs go to $OUT (the device tool's folder that comes back) or /tmp/gpu-check. The device image has torch, timm,
# tifffile, onnxruntime and OpenCV but not ultralytics, pycocotools or SAHI: carry them as wheels in .whl/ (ignored
# through .git/info/exclude; 4.4 MB, which fits the tool's 64 MiB beside the 46 MB of shipped weights), downloaded
# here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     ultralytics==8.4.190 ultralytics-thop==2.2.3 ultralytics-platform==0.1.99 pycocotools==2.0.11 sahi==0.12.8 \
#     shapely==2.2.0 fire==0.7.1 termcolor==3.3.0
# and name `.whl` in the run's carry. The device's own opencv-python-headless serves ultralytics and SAHI.
# SimpleITK (53 MB), imagecodecs and polars do not fit and are not needed: SimpleITK is imported only for .mha input,
# tifffile decodes the cases' deflate TIFFs itself, and ultralytics imports polars only for its dataframes.
set -u
cd "$(dirname "$0")/.."
LOGS=${OUT:-/tmp/gpu-check}
mkdir -p "$LOGS"
: >"$LOGS/summary.txt"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1
export MIDOG_RUNTIME__DEVICE=${MIDOG_RUNTIME__DEVICE:-cuda}
nvidia-smi -L >"$LOGS/gpu.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$LOGS/gpu.txt"

status=0
# the tests that need a GPU (the CI machine has none): resuming a training run on CUDA
$PY -m pytest -q -p no:cacheprovider tests/training/test_train_classifier.py -k cuda >"$LOGS/pytest_gpu.log" 2>&1 \
    || status=1
echo "pytest on the GPU: $(tail -n 1 "$LOGS/pytest_gpu.log")" | tee -a "$LOGS/summary.txt"
for case in test/input/*/; do
    name=$(basename "$case")
    for run in 1 2; do
        rm -rf "/tmp/gpu-$name-$run"
        $PY process.py --input "$case" --output "/tmp/gpu-$name-$run" 2>>"$LOGS/process.log" || status=1
    done
    for file in /tmp/gpu-"$name"-1/*.json; do
        if cmp -s "$file" "/tmp/gpu-$name-2/$(basename "$file")"; then
            echo "$name $(basename "$file"): $MIDOG_RUNTIME__DEVICE reruns byte-identical" | tee -a "$LOGS/summary.txt"
        else
            echo "$name $(basename "$file"): $MIDOG_RUNTIME__DEVICE reruns DIFFER" | tee -a "$LOGS/summary.txt"
            status=1
        fi
    done
    echo "$name on $MIDOG_RUNTIME__DEVICE vs the CPU expected output: $($PY -m midog.compare "/tmp/gpu-$name-1" "test/output/$name")" \
        | tee -a "$LOGS/summary.txt"
    $PY -m midog.compare "/tmp/gpu-$name-1" "test/output/$name" >/dev/null || status=1
    rm -rf "/tmp/gpu-$name-fp16"
    MIDOG_PROPOSALS__HALF=true $PY process.py --input "$case" --output "/tmp/gpu-$name-fp16" 2>>"$LOGS/process.log" \
        || status=1
    echo "$name on $MIDOG_RUNTIME__DEVICE, fp16 detector, vs the CPU expected output at 0.1: $($PY -m midog.compare --atol 0.1 "/tmp/gpu-$name-fp16" "test/output/$name")" \
        | tee -a "$LOGS/summary.txt"
done
tar -czf "$LOGS/gpu-outputs.tar.gz" -C /tmp $(cd /tmp && ls -d gpu-*-1 gpu-*-fp16)

if [ "${1:-}" != "quick" ]; then
    device=${MIDOG_RUNTIME__DEVICE}
    $PY benchmarks/gpu_modes.py --device "$device" 2>&1 | grep -v "it/s]" | tee "$LOGS/gpu_modes.log" | grep "^determ"
    $PY benchmarks/bench_track1.py --device "$device" 2>&1 | tee "$LOGS/bench_shipped.log" | tail -n 1
fi
exit $status
