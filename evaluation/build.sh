#!/usr/bin/env bash
# Build the evaluation image (grand-challenge "evaluation method") for linux/amd64, labelled with the checkout's
# revision (evaluation/export.sh stamps the tarball with it). The build context is the repository root;
# evaluation/Dockerfile.dockerignore keeps it to the package and evaluation/requirements.txt.
# Usage: [TRACK=1|2|auto] evaluation/build.sh [extra docker build args]
#   TRACK  the track the image scores (default auto: the ground truth's shape decides); a pinned track refuses the
#          other track's ground truth. The image is tagged midog-evaluation, or midog-evaluation-track<TRACK>.
set -euo pipefail
cd "$(dirname "$0")/.."
. evaluation/image.sh
case "$TRACK" in
    1|2|auto) ;;
    *) echo "error: TRACK must be 1, 2 or auto, got '$TRACK'" >&2; exit 1 ;;
esac
REVISION="$(./revision.sh)"

# BuildKit: it reads evaluation/Dockerfile.dockerignore (the classic builder would take the root .dockerignore).
DOCKER_BUILDKIT=1 docker build --platform=linux/amd64 --file evaluation/Dockerfile --build-arg "TRACK=$TRACK" \
    --label "org.opencontainers.image.revision=$REVISION" --tag "$IMAGE_TAG" "$@" .
echo "built image $IMAGE_TAG (Track $TRACK, $REVISION)"
