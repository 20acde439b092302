"""Training code: rebuilds the shipped weights from the public datasets (see docs/track2-model.md)."""
