#!/usr/bin/env bash
# Save the built image and the model tarball for upload to grand-challenge:
#   <IMAGE_TAG>.tar.gz  (docker save | gzip: the algorithm image)
#   model.tar.gz        (the contents of model/, unpacked by grand-challenge into /opt/ml/model)
# Usage: ./export.sh [output folder, default: export/]
set -euo pipefail
cd "$(dirname "$0")"
IMAGE_TAG="${IMAGE_TAG:-midog}"
OUT_DIR="${1:-export}"
mkdir -p "$OUT_DIR"

docker image inspect "$IMAGE_TAG" > /dev/null   # fails with a clear message when the image is not built
docker save "$IMAGE_TAG" | gzip -c > "$OUT_DIR/$IMAGE_TAG.tar.gz"
# Files at the top of the tarball (no leading model/), as grand-challenge expects.
tar --exclude='README.md' -czf "$OUT_DIR/model.tar.gz" -C model .
ls -lh "$OUT_DIR/$IMAGE_TAG.tar.gz" "$OUT_DIR/model.tar.gz"
