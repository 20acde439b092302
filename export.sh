#!/usr/bin/env bash
# Save the built algorithm image and the model tarball for upload to grand-challenge:
#   <IMAGE_TAG>_<revision>.tar.gz  (docker save | gzip: the algorithm image, named after the revision it was built
#                                   from, see revision.sh, so that an upload can be traced to its commit)
#   model.tar.gz                   (the contents of model/, unpacked by grand-challenge into /opt/ml/model)
# Refuses an image that build.sh did not build from the checkout as it is now (its revision label differs).
# Usage: ./export.sh [output folder, default: export/]
set -euo pipefail
cd "$(dirname "$0")"
IMAGE_TAG="${IMAGE_TAG:-midog}"
OUT_DIR="${1:-export}"
REVISION="$(./revision.sh)"

built="$(docker image inspect --format '{{ index .Config.Labels "org.opencontainers.image.revision" }}' "$IMAGE_TAG")"
if [ "$built" != "$REVISION" ]; then
    echo "error: image $IMAGE_TAG was built from revision '$built', the checkout is at '$REVISION': run ./build.sh" >&2
    exit 1
fi
case "$REVISION" in *-dirty-*) echo "warning: uncommitted changes: the image is not any commit's" >&2 ;; esac

mkdir -p "$OUT_DIR"
image_tarball="$OUT_DIR/${IMAGE_TAG}_$REVISION.tar.gz"
docker save "$IMAGE_TAG" | gzip -c > "$image_tarball"
# Files at the top of the tarball (no leading model/), as grand-challenge expects.
tar --exclude='README.md' -czf "$OUT_DIR/model.tar.gz" -C model .
ls -lh "$image_tarball" "$OUT_DIR/model.tar.gz"
