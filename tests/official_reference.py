"""The final official Track 1 container's FROC, transcribed line by line: a test oracle shared by the evaluation
tests and the evaluation container's layout test."""

from __future__ import annotations

import numpy as np


def official_froc(truths: list[list[list[float]]], detections: list[list[list[float]]],
                  score_detection=None) -> float:
    """The container's calc_froc_score, transcribed line by line (its matching is score_detection's: ours by
    default, or another implementation of it, e.g. evalutils' grand-challenge-metrics)."""
    if score_detection is None:
        from midog.evaluate.track1 import score_detection

    if not [x for x in detections if len(x) > 0]:
        return float("nan")
    scores = np.array([sc for x, y, z, cls, sc in np.vstack([x for x in detections if len(x) > 0])])
    threshold_list = ([np.min(scores)] if np.min(scores) == np.max(scores)
                      else np.linspace(np.min(scores), np.max(scores), 40).tolist())
    recalls, fppi = {}, {}
    for threshold in threshold_list:
        tps, fns, fps = 0, 0, []
        for i in range(len(detections)):
            kept = [[x, y, 0] for x, y, z, cls, sc in detections[i] if sc >= threshold]
            counts = score_detection(np.array(truths[i]), np.array(kept))
            fps.append(counts.false_positives)
            tps += counts.true_positives
            fns += counts.false_negatives
        recalls[threshold] = tps / (tps + fns + 1e-6)
        fppi[threshold] = np.mean(fps)
    fppi_arr, recall_arr = np.array(list(fppi.values())), np.array(list(recalls.values()))
    order = np.argsort(fppi_arr)
    grid = np.linspace(0, 8, 50)
    return float(np.trapezoid(np.interp(grid, fppi_arr[order], recall_arr[order], left=0,
                                        right=recall_arr[order][-1]), grid))
