#!/usr/bin/env bash
# Save the built evaluation image for upload to grand-challenge (the phase's evaluation method):
#   <IMAGE_TAG>_<revision>.tar.gz  (docker save | gzip, named after the revision it was built from, see
#                                   revision.sh, so that an upload can be traced to its commit)
# Refuses an image that evaluation/build.sh did not build from the checkout as it is now (its revision label
# differs). The ground truth is uploaded to the phase separately, as a tarball holding ground_truth.json.
# Usage: [TRACK=1|2|auto] evaluation/export.sh [output folder, default: export/]
set -euo pipefail
cd "$(dirname "$0")/.."
. evaluation/image.sh
OUT_DIR="${1:-export}"
REVISION="$(./revision.sh)"

built="$(docker image inspect --format '{{ index .Config.Labels "org.opencontainers.image.revision" }}' "$IMAGE_TAG")"
if [ "$built" != "$REVISION" ]; then
    echo "error: image $IMAGE_TAG was built from revision '$built', the checkout is at '$REVISION':" \
         "run evaluation/build.sh" >&2
    exit 1
fi
case "$REVISION" in *-dirty-*) echo "warning: uncommitted changes: the image is not any commit's" >&2 ;; esac

mkdir -p "$OUT_DIR"
image_tarball="$OUT_DIR/${IMAGE_TAG}_$REVISION.tar.gz"
docker save "$IMAGE_TAG" | gzip -c > "$image_tarball"
ls -lh "$image_tarball"
