"""The official MIDOG 2025 metrics, threshold tuning and visual reports (`python -m midog.evaluate`).

- `midog.evaluate.track1.score(predictions, ground_truth)`: detection aggregates (F1, precision, recall, AP,
  FROC AUC; overall, per tumour domain, per ROI type) as the official Track 1 evaluation container gives them.
- `midog.evaluate.track2.score(predictions, ground_truth)`: atypical-vs-normal aggregates (sensitivity,
  specificity, balanced accuracy, accuracy, ROC AUC; overall and per tumour domain).
- `midog.evaluate.tune`: the detection threshold with the best F1 and the Track 2 threshold with the best
  balanced accuracy, written into a pipeline config.
- `midog.evaluate.report`: metrics.json, summary.md and PNG figures.

Nothing heavy is imported here; import the submodule you need.
"""

from midog.evaluate.io import EvaluationError, GroundTruthError, PredictionError

__all__ = ["EvaluationError", "GroundTruthError", "PredictionError"]
