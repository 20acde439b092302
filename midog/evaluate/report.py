"""Evaluation reports: metrics.json, a short summary.md and PNG figures (matplotlib, Agg backend).

Track 1: FROC curve, precision-recall curve, F1/precision/recall against the probability threshold, per-domain and
per-ROI-type bars, and TP/FP/FN overlays on downscaled images when the images are given.
Track 2: ROC curve, confusion matrix, per-domain bars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from midog.evaluate.track1 import ROI_TYPES, ImageResult, Track1Evaluation, _domain_key, _flatten_z
from midog.evaluate.track2 import Track2Evaluation
from midog.evaluate.tune import TunedThreshold, tune_classification, tune_detection
from midog.outputs import write_json_atomic

OVERLAY_MAX_SIDE = 1600
OVERLAY_MARKER_SIZE = 150
"""Marker area in points², constant whatever the image size."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Legends sit outside the axes: the saved area is grown to hold them."""
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _fmt(value: float | None) -> str:
    """A summary.md cell: "n/a" for an undefined value (a `GroupRow`'s None), as the figures mark it."""
    return "n/a" if value is None else f"{value:.4f}"


# ---- Track 1 -------------------------------------------------------------------------------------------------

def plot_froc(evaluation: Track1Evaluation, path: Path) -> Path:
    plt = _pyplot()
    froc = evaluation.froc
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(froc.grid, froc.grid_sensitivity, "-", color="tab:blue", label=f"interpolated (AUC {froc.auc:.3f} / "
                                                                             f"{froc.grid[-1]:.0f})")
    ax.plot(froc.fp_per_image, froc.sensitivity, "o", ms=3, color="tab:orange", label="thresholds")
    ax.set_xlim(0, froc.grid[-1])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per image")
    ax.set_ylabel("sensitivity")
    ax.set_title("FROC (all candidates, by probability)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def _no_points_figure(path: Path, title: str) -> Path:
    """The figure for a set without any predicted point: there is no curve to draw."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.text(0.5, 0.5, "no predicted point in any image", ha="center", va="center")
    ax.set_axis_off()
    ax.set_title(title)
    return _save(fig, path)


def plot_precision_recall(evaluation: Track1Evaluation, path: Path) -> Path:
    plt = _pyplot()
    curve, agg = evaluation.curve, evaluation.aggregates
    if len(curve.thresholds) == 0:
        return _no_points_figure(path, "precision-recall")
    threshold, f1 = curve.best()
    best = int(np.flatnonzero(curve.thresholds == threshold)[0])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot(curve.recall, curve.precision, "-", color="tab:blue", label=f"probability sweep (AP {agg['AP']:.3f})")
    ax.plot(curve.recall[best], curve.precision[best], "*", ms=14, color="tab:green",
            label=f"best F1 {f1:.3f} at p >= {threshold:.3f}")
    ax.plot(agg["recall"], agg["precision"], "s", ms=9, color="tab:red",
            label=f"submitted names (F1 {agg['f1_score']:.3f})")
    for target in (0.5, 0.6, 0.7, 0.8):
        r = np.linspace(target / 2 + 1e-3, 1, 200)
        ax.plot(r, target * r / (2 * r - target), ":", color="grey", lw=0.7)
        ax.text(0.99, target / (2 - target) + 0.01, f"F1={target}", fontsize=7, color="grey", ha="right",
                va="bottom")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall (7.5 µm matching)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_f1_threshold(evaluation: Track1Evaluation, path: Path) -> Path:
    plt = _pyplot()
    curve = evaluation.curve
    if len(curve.thresholds) == 0:
        return _no_points_figure(path, "F1 against the detection threshold")
    threshold, f1 = curve.best()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(curve.thresholds, curve.f1, "-", color="tab:green", lw=2, label="F1")
    ax.plot(curve.thresholds, curve.precision, "-", color="tab:blue", label="precision")
    ax.plot(curve.thresholds, curve.recall, "-", color="tab:orange", label="recall")
    ax.axvline(threshold, color="tab:green", ls="--", lw=1)
    ax.annotate(f"best F1 {f1:.3f}\nat p >= {threshold:.3f}", (threshold, f1), textcoords="offset points",
                xytext=(8, -30), fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("probability threshold (candidates kept when p >= threshold)")
    ax.set_ylabel("score")
    ax.set_title("F1 against the detection threshold")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    return _save(fig, path)


@dataclass(frozen=True)
class GroupRow:
    """One group of a per-group bar chart: its name, its counts and its values (None where undefined)."""
    name: str
    counts: str
    values: dict[str, float | None]

    @property
    def label(self) -> str:
        return f"{self.name}\n{self.counts}"


TRACK1_BARS = ("f1", "precision", "recall", "AP")
TRACK2_BARS = ("balanced_accuracy", "sensitivity", "specificity", "roc_auc")
TRACK1_COLUMNS = (*TRACK1_BARS, "froc_auc")
TRACK2_COLUMNS = ("balanced_accuracy", "sensitivity", "specificity", "accuracy", "roc_auc")
"""The metrics of summary.md's tables: the figures' bars and the rest of the official ones, n/a by the same rule."""
TRACK1_OVERALL_KEYS = {"f1": "f1_score"}
"""The aggregates' names of the overall Track 1 metrics that differ from the groups' (`tumor_0_f1`: `f1_score`)."""


def _defined(value: Any) -> float | None:
    """None for the official encodings of an undefined value: NaN, or -1 (AP without ground truth)."""
    if value is None or math.isnan(value) or value < 0:
        return None
    return float(value)


def _bar_legend(ax: Any, names: Sequence[str]) -> None:
    """The series legend right of the axes, never over a bar or a label."""
    from matplotlib.patches import Patch

    handles = [Patch(color=f"C{i}", label=name) for i, name in enumerate(names)]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)


def _bars(ax: Any, rows: Sequence[GroupRow], names: Sequence[str], title: str, legend: bool = True) -> None:
    """Grouped bars, one group per row; an undefined value gets no bar but an "n/a" where its bar would stand."""
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(rows))
    for i, name in enumerate(names):
        offsets = x + (i - (len(names) - 1) / 2) * width
        values = [row.values[name] for row in rows]
        shown = [j for j, v in enumerate(values) if v is not None]
        bars = ax.bar(offsets[shown], [values[j] for j in shown], width, color=f"C{i}")
        ax.bar_label(bars, labels=[f"{values[j]:.2f}" for j in shown], fontsize=6, rotation=90, padding=2)
        for j in (j for j, v in enumerate(values) if v is None):
            ax.text(offsets[j], 0.02, "n/a", ha="center", va="bottom", rotation=90, fontsize=6, color=f"C{i}")
    ax.set_xticks(x)
    crowded = len(rows) >= 8
    ax.set_xticklabels([row.label for row in rows], rotation=45 if crowded else 0, ha="right" if crowded else "center",
                       fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if legend:
        _bar_legend(ax, names)


def _track1_domains(agg: dict[str, Any]) -> list[str]:
    return [k[len("tumor_"):-len("_f1")] for k in agg if k.startswith("tumor_") and k.endswith("_f1")]


def _track1_row(name: str, prefix: str | None, agg: dict[str, Any], results: Sequence[ImageResult],
                metrics: Sequence[str] = TRACK1_BARS) -> GroupRow:
    """F1, recall, AP and FROC AUC are undefined without ground truth, precision without detections: None, not the
    official 0 (or -1, or eps-driven) value. Detections where there is no ground truth are all false positives:
    precision 0, a real figure. `prefix` None: the overall aggregates."""
    tp = sum(r.score.true_positives for r in results)
    gt = tp + sum(r.score.false_negatives for r in results)
    det = tp + sum(r.score.false_positives for r in results)
    defined = {"f1": gt > 0, "precision": det > 0, "recall": gt > 0, "AP": gt > 0, "froc_auc": gt > 0}
    keys = {m: f"{prefix}_{m}" if prefix else TRACK1_OVERALL_KEYS.get(m, m) for m in metrics}
    values = {m: _defined(agg.get(keys[m], math.nan)) if defined[m] else None for m in metrics}
    return GroupRow(name, f"GT {gt}, det {det}, TP {tp}", values)


def track1_group_rows(evaluation: Track1Evaluation, metrics: Sequence[str] = TRACK1_BARS
                      ) -> tuple[list[GroupRow], list[GroupRow]]:
    """The per-tumour-domain and per-ROI-type rows `per_domain.png` draws (summary.md: with `TRACK1_COLUMNS`)."""
    agg, images = evaluation.aggregates, evaluation.images
    domains = [_track1_row(f"domain {d}", f"tumor_{d}", agg,
                           [r for r in images if _domain_key(r.truth.tumor_domain) == d], metrics)
               for d in _track1_domains(agg)]
    rois = [_track1_row(t, f"roi_type_{t}", agg, [r for r in images if r.truth.roi_type == t], metrics)
            for t in ROI_TYPES if any(r.truth.roi_type == t for r in images)]
    return domains, rois


def track1_groups_figure(evaluation: Track1Evaluation) -> Any:
    plt = _pyplot()
    domains, rois = track1_group_rows(evaluation)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * (len(domains) + len(rois)) + 5), 5),
                             gridspec_kw={"width_ratios": [max(len(domains), 1), max(len(rois), 1)]})
    _bars(axes[0], domains, TRACK1_BARS, "Per tumour domain (n/a: undefined)", legend=False)
    _bars(axes[1], rois, TRACK1_BARS, "Per ROI type")
    return fig


def plot_track1_groups(evaluation: Track1Evaluation, path: Path) -> Path:
    return _save(track1_groups_figure(evaluation), path)


def _find_image(images_dir: Path, name: str) -> Path | None:
    for candidate in (images_dir / name, *sorted(images_dir.rglob(name))):
        if candidate.is_file():
            return candidate
    return None


def _read_downscaled(path: Path, spacing_um: float | None) -> tuple[np.ndarray, Any]:
    """Every `step`-th pixel of the ROI (read in strips, so a large ROI never sits in memory whole), and a
    function mm (N, 2) → downscaled pixel coordinates. The image's own pixel → mm transform is used (what the
    pipeline wrote its points with) unless `spacing_um` overrides it."""
    from midog.roi_io import open_roi

    with open_roi(path) as roi:
        step = max(1, int(math.ceil(max(roi.width, roi.height) / OVERLAY_MAX_SIDE)))
        rows = []
        strip = step * 256
        for y in range(0, roi.height, strip):
            rows.append(roi.read_region(0, y, roi.width, min(strip, roi.height - y))[::step, ::step])
        pixels = np.concatenate(rows, axis=0)
        transform = roi.transform
    if spacing_um:
        def to_px(mm: np.ndarray) -> np.ndarray:
            return np.asarray(mm, dtype=np.float64)[:, :2] / (spacing_um / 1000.0) / step
    else:
        direction = np.asarray(transform.direction, dtype=np.float64).reshape(2, 2)
        inverse = np.linalg.inv(direction)

        def to_px(mm: np.ndarray) -> np.ndarray:
            local = (np.asarray(mm, dtype=np.float64)[:, :2] - np.asarray(transform.origin_mm)) @ inverse.T
            return local / np.asarray(transform.spacing_mm) / step
    return pixels, to_px


def overlay_figure(result: ImageResult, image_path: Path, spacing_um: float | None = None) -> Any:
    """TP/FP/FN and non-mitotic markers on the downscaled image; the legend below the image, off every marker."""
    plt = _pyplot()
    pixels, to_px = _read_downscaled(image_path, spacing_um)
    pred = result.prediction
    mitotic = _flatten_z(pred.points[pred.mitotic])
    matched = result.score.matched_predictions
    fig, ax = plt.subplots(figsize=(9, 9 * pixels.shape[0] / max(pixels.shape[1], 1)))
    ax.imshow(pixels)
    ax.set_xlim(-0.5, pixels.shape[1] - 0.5)
    ax.set_ylim(pixels.shape[0] - 0.5, -0.5)
    other = pred.points[~pred.mitotic]
    if len(other):
        xy = to_px(other)
        ax.scatter(xy[:, 0], xy[:, 1], s=40, marker="x", color="cyan", linewidths=1.2, zorder=4,
                   label=f"non-mitotic candidates ({len(other)})")
    groups = [(mitotic[matched], "lime", "o", "TP"), (mitotic[~matched], "red", "s", "FP"),
              (result.truth.points[~result.score.matched_truth], "yellow", "D", "FN")]
    for pts, colour, marker, label in groups:
        if len(pts):
            xy = to_px(pts)
            ax.scatter(xy[:, 0], xy[:, 1], s=OVERLAY_MARKER_SIZE, facecolors="none",
                       edgecolors=colour, linewidths=1.8, marker=marker, label=f"{label} ({len(pts)})")
    s = result.score
    ax.set_title(f"{result.truth.name} ({result.truth.roi_type}, domain {result.truth.tumor_domain}): "
                 f"TP {s.true_positives}  FP {s.false_positives}  FN {s.false_negatives}")
    ax.set_axis_off()
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=len(handles), fontsize=8)
    return fig


def plot_overlay(result: ImageResult, image_path: Path, path: Path, spacing_um: float | None = None) -> Path:
    return _save(overlay_figure(result, image_path, spacing_um), path)


def _table_row(label: str, row: GroupRow, metrics: Sequence[str]) -> str:
    """One line of a summary.md table: `row`'s values, "n/a" where the figures say n/a."""
    return f"| {label} | " + " | ".join(_fmt(row.values[m]) for m in metrics) + " |"


def _track1_summary(evaluation: Track1Evaluation, tuned: TunedThreshold, figures: list[Path]) -> str:
    agg = evaluation.aggregates
    tp = sum(r.score.true_positives for r in evaluation.images)
    fp = sum(r.score.false_positives for r in evaluation.images)
    fn = sum(r.score.false_negatives for r in evaluation.images)
    overall = _track1_row("overall", None, agg, evaluation.images, TRACK1_COLUMNS)
    domains, rois = track1_group_rows(evaluation, TRACK1_COLUMNS)
    lines = ["# Track 1 evaluation", "",
             f"{len(evaluation.images)} images; TP {tp}, FP {fp}, FN {fn} (points named \"mitotic figure\", "
             "7.5 µm matching).", "",
             "| group | F1 | precision | recall | AP | FROC AUC (0-8) |", "|---|---|---|---|---|---|",
             _table_row("overall", overall, TRACK1_COLUMNS)]
    lines += [_table_row(row.name, row, TRACK1_COLUMNS) for row in domains]
    lines += [_table_row(f"ROI {row.name}", row, TRACK1_COLUMNS) for row in rois]
    best = (f"Best F1 over all candidates by probability: {tuned.value:.4f} at `{tuned.key}: "
            f"{tuned.threshold:.4f}` (the names in the outputs give F1 {agg['f1_score']:.4f})." if tuned else
            "No predicted point in any image: no threshold to choose.")
    lines += ["", best, "",
              "n/a: undefined for the group, as in the figures (F1, recall, AP and FROC AUC without ground truth, "
              "precision without detections); metrics.json keeps the official values (AP -1 without ground truth, "
              "F1 1 for a group without any point).", "", "## Figures", ""]
    lines += [f"- ![{p.stem}]({p.name})" for p in figures]
    return "\n".join(lines) + "\n"


def write_track1_report(evaluation: Track1Evaluation, out_dir: str | Path, images_dir: str | Path | None = None,
                        spacing_um: float | None = None, max_overlays: int = 12) -> list[Path]:
    """metrics.json, summary.md and figures in `out_dir`; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = [plot_froc(evaluation, out / "froc.png"),
               plot_precision_recall(evaluation, out / "precision_recall.png"),
               plot_f1_threshold(evaluation, out / "f1_threshold.png"),
               plot_track1_groups(evaluation, out / "per_domain.png")]
    if images_dir is not None:
        ranked = sorted(evaluation.images, key=lambda r: -(r.score.false_positives + r.score.false_negatives))
        written = 0
        for result in ranked:
            found = _find_image(Path(images_dir), result.truth.name)
            if found is None or written >= max_overlays:
                continue
            figures.append(plot_overlay(result, found, out / f"overlay_{Path(result.truth.name).stem}.png",
                                        spacing_um))
            written += 1
    tuned = tune_detection(evaluation) if len(evaluation.curve.thresholds) else None
    metrics = write_json_atomic(out / "metrics.json", evaluation.metrics())
    summary = out / "summary.md"
    summary.write_text(_track1_summary(evaluation, tuned, figures))
    return [metrics, summary, *figures]


# ---- Track 2 -------------------------------------------------------------------------------------------------

def plot_roc(evaluation: Track2Evaluation, path: Path) -> Path:
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    y_true, y_score = evaluation.y_true, evaluation.y_score
    agg = evaluation.aggregates
    fig, ax = plt.subplots(figsize=(5.5, 5))
    if len(np.unique(y_true)) == 2:
        fpr, tpr, _ = roc_curve(y_true, y_score)
        ax.plot(fpr, tpr, "-", color="tab:blue", label=f"ROC (AUC {agg['overall_roc_auc']:.3f})")
    ax.plot(1 - agg["overall_specificity"], agg["overall_sensitivity"], "s", ms=9, color="tab:red",
            label=f"submitted classes (BA {agg['overall_balanced_accuracy']:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("1 - specificity (normal called atypical)")
    ax.set_ylabel("sensitivity (atypical found)")
    ax.set_title("Track 2 ROC, score = P(atypical)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_confusion(evaluation: Track2Evaluation, path: Path) -> Path:
    plt = _pyplot()
    y_true, y_pred = evaluation.y_true, evaluation.y_pred
    matrix = np.array([[np.sum((y_true == t) & (y_pred == p)) for p in (0, 1)] for t in (0, 1)])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    for t in range(2):
        for p in range(2):
            ax.text(p, t, str(matrix[t, p]), ha="center", va="center", fontsize=16,
                    color="white" if matrix[t, p] > matrix.max() / 2 else "black")
    ax.set_xticks([0, 1])
    ax.set_xticklabels(["normal", "atypical"])
    ax.set_yticks([0, 1])
    ax.set_yticklabels(["normal", "atypical"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title("Confusion matrix")
    return _save(fig, path)


def _track2_row(name: str, labels: np.ndarray, official: Mapping[str, Any],
                metrics: Sequence[str] = TRACK2_BARS) -> GroupRow:
    """Sensitivity is undefined (None) without atypical pages, specificity without normal ones, balanced accuracy
    and ROC AUC when either is (the official values say 0 or NaN), accuracy without pages."""
    positives, negatives = int(np.sum(labels == 1)), int(np.sum(labels == 0))
    both = positives > 0 and negatives > 0
    defined = {"sensitivity": positives > 0, "specificity": negatives > 0, "balanced_accuracy": both,
               "roc_auc": both, "accuracy": len(labels) > 0}
    values = {m: _defined(official.get(m, math.nan)) if defined[m] else None for m in metrics}
    return GroupRow(name, f"{len(labels)} pages, {positives} atypical", values)


def track2_domain_rows(evaluation: Track2Evaluation, metrics: Sequence[str] = TRACK2_BARS) -> list[GroupRow]:
    """The rows `per_domain.png` draws (summary.md: with `TRACK2_COLUMNS`), n/a by `_track2_row`'s rule."""
    y_true, domains, agg = evaluation.y_true, evaluation.domains, evaluation.aggregates
    return [_track2_row(f"domain {domain}", y_true[domains == domain], agg[f"domain_{domain}"], metrics)
            for domain in np.sort(np.unique(domains))]


def track2_domain_figure(evaluation: Track2Evaluation) -> Any:
    plt = _pyplot()
    rows = track2_domain_rows(evaluation)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(rows) + 3), 4.5))
    _bars(ax, rows, TRACK2_BARS, "Track 2 per tumour domain (n/a: undefined)")
    return fig


def plot_track2_domains(evaluation: Track2Evaluation, path: Path) -> Path:
    return _save(track2_domain_figure(evaluation), path)


def _track2_summary(evaluation: Track2Evaluation, tuned: TunedThreshold, figures: list[Path]) -> str:
    agg = evaluation.aggregates
    overall = _track2_row("overall", evaluation.y_true, {m: agg.get(f"overall_{m}", math.nan) for m in TRACK2_COLUMNS},
                          TRACK2_COLUMNS)
    lines = ["# Track 2 evaluation", "", f"{len(evaluation.stacks)} stacks, {len(evaluation.y_true)} pages "
             f"({int(evaluation.y_true.sum())} atypical).", "",
             "| group | balanced accuracy | sensitivity | specificity | accuracy | ROC AUC |",
             "|---|---|---|---|---|---|", _table_row("overall", overall, TRACK2_COLUMNS)]
    lines += [_table_row(row.name, row, TRACK2_COLUMNS) for row in track2_domain_rows(evaluation, TRACK2_COLUMNS)]
    lines += ["", f"Best balanced accuracy over P(atypical) thresholds: {tuned.value:.4f} at "
                  f"`{tuned.key}: {tuned.threshold:.4f}`.", "",
              "n/a: undefined for the group, as in the figures (sensitivity without atypical pages, specificity "
              "without normal ones, balanced accuracy and ROC AUC without either); metrics.json keeps the official "
              "values.", "",
              "P(atypical) is read as the official evaluator reads it: `confidence` when the class is atypical, "
              "`1 - confidence` when it is normal.", "", "## Figures", ""]
    lines += [f"- ![{p.stem}]({p.name})" for p in figures]
    return "\n".join(lines) + "\n"


def write_track2_report(evaluation: Track2Evaluation, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = [plot_roc(evaluation, out / "roc.png"), plot_confusion(evaluation, out / "confusion_matrix.png"),
               plot_track2_domains(evaluation, out / "per_domain.png")]
    tuned = tune_classification(evaluation)
    metrics = write_json_atomic(out / "metrics.json", evaluation.metrics())
    summary = out / "summary.md"
    summary.write_text(_track2_summary(evaluation, tuned, figures))
    return [metrics, summary, *figures]
