#!/usr/bin/env bash
# Print the checkout's revision, which build.sh and evaluation/build.sh put on the image as a label and export.sh and
# evaluation/export.sh put in the tarball's name: `git describe --always --dirty`, and when tracked files have
# uncommitted changes, a hash of those changes after "-dirty", so that an image built before a further edit is not
# taken for the current one. "unknown" outside a git checkout.
set -euo pipefail
cd "$(dirname "$0")"
revision="$(git describe --always --dirty 2> /dev/null || echo unknown)"
case "$revision" in
    *-dirty) revision="$revision-$(git diff HEAD | sha1sum | cut -c1-8)" ;;
esac
echo "$revision"
