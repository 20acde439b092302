"""Image reading: pixels together with their metadata (spacing), RGB uint8 out, whatever came in."""

from __future__ import annotations


# ---- Track 2: multi-page stacks -----------------------------------------------------------------------------------


# ---- Track 1: regions of interest, read tile by tile ---------------------------------------------------------------
