"""Check an evaluation run's metrics.json against an expected one: every aggregate of the expected file (nested
tables included) must be in the run's file and equal within --atol (NaN equals NaN), and the run's per-job `results`
must be the expected file's in any order (the final Track 1 container keeps per-image results with their ground
truth emptied; Track 2's are empty). Aggregates the expected file lacks are not checked (the published Track 1 file
predates FROC and the tumour x ROI-type table).

    python check_metrics.py ACTUAL_METRICS_JSON EXPECTED_METRICS_JSON [--atol 1e-6]

Prints one line, `OK: ...` or `MISMATCH: ...`; exit 0 when everything matches, 1 otherwise. Standard library only:
evaluation/test.sh runs it inside the evaluation image.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"domain_1": {"roc_auc": x}} -> {"domain_1.roc_auc": x}."""
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unordered(results: Any) -> list[Any]:
    """Per-job results sorted by image (then by their JSON text): the container writes them in job order, the
    published file in the order its jobs completed; an empty list and an empty mapping are the same nothing. Compared
    as values, so 0 and 0.0 are equal as in the aggregates."""
    if not results:
        return []
    entries = list(results.values() if isinstance(results, dict) else results)

    def key(entry: Any) -> tuple[str, str]:
        image = entry.get("image") if isinstance(entry, dict) else None
        return (str(image), "" if image is not None else json.dumps(entry, sort_keys=True))

    return sorted(entries, key=key)


def differences(actual: dict[str, Any], expected: dict[str, Any], atol: float) -> list[str]:
    found = []
    if unordered(actual.get("results")) != unordered(expected.get("results")):
        found.append(f"per-job results differ from the expected file's ({len(actual.get('results') or [])} against "
                     f"{len(expected.get('results') or [])})")
    mine = flatten(actual.get("aggregates") or {})
    for key, value in flatten(expected.get("aggregates") or {}).items():
        if key not in mine:
            found.append(f"{key}: missing")
        elif not isinstance(mine[key], (int, float)) or isinstance(mine[key], bool):
            found.append(f"{key}: expected {value!r}, got {mine[key]!r}")
        elif not (math.isnan(value) and math.isnan(mine[key])) and not math.isclose(mine[key], value, rel_tol=0,
                                                                                        abs_tol=atol):
            found.append(f"{key}: expected {value!r}, got {mine[key]!r}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("actual", type=Path)
    parser.add_argument("expected", type=Path)
    parser.add_argument("--atol", type=float, default=1e-6)
    args = parser.parse_args(argv)
    if not args.actual.is_file():
        print(f"MISMATCH: no {args.actual}")
        return 1
    expected = json.loads(args.expected.read_text())
    found = differences(json.loads(args.actual.read_text()), expected, args.atol)
    if found:
        print("MISMATCH: " + "; ".join(found))
        return 1
    print(f"OK: {len(flatten(expected.get('aggregates') or {}))} aggregates of {args.expected} match "
          f"(atol {args.atol:g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
