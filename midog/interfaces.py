"""The grand-challenge interfaces this container answers: input slugs and the folders their images arrive in.

One home for names that `cli` (dispatch) and `pipeline` (reading) both need, so neither imports the other.
"""

from __future__ import annotations

TRACK1_SLUG = "histopathology-region-of-interest-cropout"
"""Track 1 input interface (`/input/inputs.json`)."""
TRACK1_IMAGE_FOLDER = "histopathology-roi-cropout"
"""Track 1's image arrives in `/input/images/<this>/` (the platform's folder name differs from the slug)."""
TRACK2_SLUG = "stacked-histopathology-roi-cropouts"
"""Track 2 input interface; its stack arrives in `/input/images/<slug>/`."""
TRACK2_IMAGE_FOLDER = TRACK2_SLUG
