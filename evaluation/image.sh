# Sourced by evaluation/build.sh, test.sh and export.sh (from the repository root): the track the image is built
# for (TRACK: 1, 2 or auto) and the image's tag, one per track, unless IMAGE_TAG is set.
TRACK="${TRACK:-auto}"
IMAGE_TAG="${IMAGE_TAG:-midog-evaluation$([ "$TRACK" = auto ] || echo "-track$TRACK")}"
