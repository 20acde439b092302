"""The only module that knows the order of the stages. One function per track, called by process.py."""

from __future__ import annotations

from pathlib import Path

from midog.config import PipelineConfig


# ---- Track 2: atypical vs normal on a stack of crops -------------------------------------------------------------

def run_track2(input_dir: Path, output_dir: Path, config: PipelineConfig) -> Path:
    raise NotImplementedError("Track 2 pipeline")


# ---- Track 1: detection on a region of interest ------------------------------------------------------------------

def run_track1(input_dir: Path, output_dir: Path, config: PipelineConfig) -> Path:
    raise NotImplementedError("Track 1 pipeline")
