#!/usr/bin/env bash
# Run the evaluation image on the official evaluation containers' test vectors the way grand-challenge runs an
# evaluation method (no network, read-only but /output and /tmp, 15 GB: a 16 GB instance less the 1 GB the platform
# keeps), and check its metrics.json with evaluation/check_metrics.py, run inside the image:
# - Track 1 (DeepMicroscopy/MIDOG25_T1_evaluation_docker's test/ and ground_truth/): as with the final container, the
#   run must fail with one error line and no metrics.json (job 007.tiff has a point at 130 mm: pixel coordinates);
#   with --no-coordinate-check it must reproduce every aggregate of the published test/output/metrics.json.
# - Track 2 (..._T2_...): every aggregate of evaluation/test/track2-expected-metrics.json, the final container's
#   numbers on those vectors (none are published; tests/test_evaluation_container.py checks that file).
# The vectors are read from $VECTORS (default: ../shared/data/grand-challenge beside the checkout), folders
# track1-evaluation/ and track2-evaluation/.
# Usage: [TRACK=1|2|auto] evaluation/test.sh      (an image built for one track is tested on that track only);
#        SKIP_BUILD=1 to test an image already built.
set -euo pipefail
cd "$(dirname "$0")/.."
. evaluation/image.sh
MEM_LIMIT="${MEM_LIMIT:-15g}"
VECTORS="${VECTORS:-$PWD/../shared/data/grand-challenge}"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    TRACK="$TRACK" IMAGE_TAG="$IMAGE_TAG" evaluation/build.sh
fi

evaluate() {   # evaluate <vectors folder> <output folder> [argument ...]: the platform's run
    local vectors="$1" output="$2"
    shift 2
    docker run --rm \
        --network none \
        --read-only --tmpfs /tmp:rw,size=1g \
        --memory "$MEM_LIMIT" --memory-swap "$MEM_LIMIT" \
        --pids-limit 256 \
        --cap-drop ALL \
        --security-opt no-new-privileges \
        --volume "$vectors/test/input:/input:ro" \
        --volume "$vectors/ground_truth:/opt/ml/input/data/ground_truth:ro" \
        --volume "$output:/output" \
        "$IMAGE_TAG" "$@"
}

check() {   # check <output folder> <folder of the expected file> <expected file name>
    docker run --rm --network none --read-only --entrypoint python \
        --volume "$PWD/evaluation/check_metrics.py:/opt/check/check_metrics.py:ro" \
        --volume "$1:/output:ro" --volume "$2:/expected:ro" \
        "$IMAGE_TAG" /opt/check/check_metrics.py /output/metrics.json "/expected/$3"
}

failed=0
for track in 1 2; do
    if [ "$TRACK" != auto ] && [ "$TRACK" != "$track" ]; then
        continue
    fi
    vectors="$VECTORS/track$track-evaluation"
    if [ ! -d "$vectors/test/input" ] || [ ! -d "$vectors/ground_truth" ]; then
        echo "FAILED: Track $track: no test vectors at $vectors (test/input/, ground_truth/: copy them from" \
             "DeepMicroscopy/MIDOG25_T${track}_evaluation_docker, or set VECTORS)"
        failed=1
        continue
    fi
    output_dir="$(mktemp -d)"
    chmod 777 "$output_dir"   # the container's non-root user writes here
    echo "== Track $track"
    if [ "$track" = 1 ]; then
        errors="$(mktemp)"
        if evaluate "$vectors" "$output_dir" 2> "$errors"; then
            echo "FAILED: Track 1: the coordinate check let the published vectors' 130 mm point through"
            failed=1
        elif [ -e "$output_dir/metrics.json" ] || [ "$(wc -l < "$errors" | tr -d ' ')" != 1 ]; then
            echo "FAILED: Track 1: a rejected run must leave one error line and no metrics.json"
            failed=1
        else
            echo "rejected, as by the final container: $(cat "$errors")"
        fi
        rm -f "$errors"
        if ! evaluate "$vectors" "$output_dir" --no-coordinate-check > /dev/null \
                || ! check "$output_dir" "$vectors/test/output" metrics.json; then
            echo "FAILED: Track 1 with --no-coordinate-check"
            failed=1
        fi
    elif ! evaluate "$vectors" "$output_dir" > /dev/null \
            || ! check "$output_dir" "$PWD/evaluation/test" track2-expected-metrics.json; then
        echo "FAILED: Track 2"
        failed=1
    fi
    rm -rf "$output_dir"
done
exit "$failed"
