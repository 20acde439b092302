"""midog: MIDOG 2025 mitotic-figure detection (Track 1) and atypical classification (Track 2)."""

__version__ = "0.1.0"
