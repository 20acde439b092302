#!/usr/bin/env bash
# Build the algorithm image for linux/amd64 (what grand-challenge runs), labelled with the checkout's revision
# (export.sh stamps the tarball with it). Usage: ./build.sh [extra docker build args, e.g. --build-arg BASE_IMAGE=...]
set -euo pipefail
cd "$(dirname "$0")"
IMAGE_TAG="${IMAGE_TAG:-midog}"

if [ ! -d weights ]; then
    echo "error: weights/ is missing: the image ships the trained checkpoints from there (see docs/container.md)" >&2
    exit 1
fi
REVISION="$(./revision.sh)"
docker build --platform=linux/amd64 --label "org.opencontainers.image.revision=$REVISION" --tag "$IMAGE_TAG" "$@" .
echo "built image $IMAGE_TAG ($REVISION)"
