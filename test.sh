#!/usr/bin/env bash
# Run the built image on every case in test/input/ the way grand-challenge runs it, and compare the outputs with
# test/output/<case>/expected_output.json (numeric tolerance, midog.compare run inside the image).
# Usage: ./test.sh [case ...]      (default: every case); set SKIP_BUILD=1 to test an image already built.
set -euo pipefail
cd "$(dirname "$0")"
IMAGE_TAG="${IMAGE_TAG:-midog}"
MEM_LIMIT="${MEM_LIMIT:-15g}"   # a 16 GB instance, less the 1 GB the platform keeps

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    ./build.sh
fi

GPU_ARGS=()
if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi > /dev/null 2>&1; then
    GPU_ARGS=(--gpus all)
fi
mkdir -p model   # mounted at /opt/ml/model even when empty, like grand-challenge's model tarball

if [ "$#" -gt 0 ]; then
    CASES=("$@")
else
    CASES=()
    for dir in test/input/*/; do CASES+=("$(basename "$dir")"); done
fi

failed=0
for case in "${CASES[@]}"; do
    output_dir="$(mktemp -d)"
    chmod 777 "$output_dir"   # the container's non-root user writes here
    echo "== $case"
    if ! docker run --rm \
            ${GPU_ARGS[@]+"${GPU_ARGS[@]}"} \
            --network none \
            --read-only --tmpfs /tmp:rw,size=2g \
            --memory "$MEM_LIMIT" --memory-swap "$MEM_LIMIT" \
            --shm-size 128m \
            --pids-limit 256 \
            --cap-drop ALL \
            --security-opt no-new-privileges \
            --volume "$PWD/test/input/$case:/input:ro" \
            --volume "$PWD/model:/opt/ml/model:ro" \
            --volume "$output_dir:/output" \
            "$IMAGE_TAG"; then
        echo "FAILED: $case: the container exited non-zero"
        failed=1
    elif ! docker run --rm --network none --read-only --entrypoint python \
            --volume "$output_dir:/output:ro" \
            --volume "$PWD/test/output/$case:/expected:ro" \
            "$IMAGE_TAG" -m midog.compare /output /expected; then
        failed=1
    fi
    rm -rf "$output_dir"
done
exit "$failed"
