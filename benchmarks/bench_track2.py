"""Track 2 speed and memory: model load and classification of a 16-page stack timed apart, then a 2,000-page stack
end to end (run_track2) with its peak resident memory.

    python benchmarks/bench_track2.py [--large-pages 2000] [--repeats 5] [--threads 0]
        [--compare-weights atypical.pt atypical_lite0_128.pt [--compare-tta-views 8 4] [--compare-backend torch]]

Target on the development CPU: classifying a 16-page stack takes under 1 s once the model is loaded.
Uses the shipped atypical weights (found like the container finds them) when present; otherwise a randomly
initialised stand-in with the architecture and input size of training/configs/atypical.yaml, and says so.
Numbers are printed, never asserted (the machine may be shared). `--compare-weights` also loads another weights list
(e.g. a candidate ensemble) and times both on the same 16-page stack in alternating runs, one thread, printing the
ratio of their medians: the form a speed budget such as "at most 2x the shipped model" is checked in, since the
development CPU's speed varies between hours.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from midog.atypical import load_atypical  # noqa: E402
from midog.classifier import build_classifier  # noqa: E402
from midog.config import BACKENDS, resolve_config  # noqa: E402
from midog.errors import WeightsError  # noqa: E402
from midog.outputs import TRACK2_FILENAME  # noqa: E402
from midog.pipeline import run_track2  # noqa: E402
from midog.stack_io import open_stack  # noqa: E402
from midog.weights import find_weights  # noqa: E402


def stack_factory():
    spec = importlib.util.spec_from_file_location("stack_factory", REPO_ROOT / "tests" / "stack_factory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def large_stack_input(root: Path, pages: int) -> Path:
    """A Track 2 input folder at `root` whose stack holds `pages` pages (50 generated 128 px crops, repeated); the
    stack's path. Also used by benchmarks/bench_limits.py."""
    factory = stack_factory()
    distinct = factory.he_pages(50, size=128, seed=1)
    return factory.write_tiff(factory.track2_input(root), [distinct[i % 50] for i in range(pages)])


def resolve_weights(config, scratch: Path) -> tuple[str, str]:
    """(weights to use, how they were chosen)."""
    names = [config.atypical.weights] if isinstance(config.atypical.weights, str) else config.atypical.weights
    try:
        paths = [str(find_weights(name)) for name in names]
        return paths if len(paths) > 1 else paths[0], f"shipped weights {', '.join(paths)}"
    except WeightsError:
        training = yaml.safe_load((REPO_ROOT / "training" / "configs" / "atypical.yaml").read_text())
        arch, size = training["arch"], int(training["input_size"])
        torch.manual_seed(0)
        path = build_classifier(arch, input_size=size, positive="atypical").save(scratch / "standin.pt")
        return str(path), f"STAND-IN: random {arch} at {size} px (no shipped atypical weights found)"


class PeakRss:
    """Peak resident set size of this process, sampled every 20 ms."""

    def __init__(self) -> None:
        self.peak = psutil.Process().memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, process.memory_info().rss)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def time_stack(classifier, stack_path: Path, config) -> float:
    """Seconds to read and classify every page of the stack once."""
    started = time.perf_counter()
    with open_stack(stack_path) as stack:
        for batch in stack.iter_batches(config.atypical.batch_size, config.atypical.max_batch_pixels):
            classifier.predict_proba(batch)
    return time.perf_counter() - started


def compare_weights(config, weights: list[str], stack_path: Path, repeats: int,
                    views: list[int] | None = None, backend: str | None = None) -> None:
    """The shipped classifier and `weights` (found as the container finds them; `views`: their TTA views, one
    number or one per file, else the config's; `backend`: theirs, else the config's) timed on one stack, one
    thread, runs alternating so a change in the machine's speed hits both; prints both medians and their ratio."""
    torch.set_num_threads(1)  # before loading: an ONNX Runtime session takes torch's thread count at load
    shipped = load_atypical(config.atypical, foundation=config.foundation)
    other_config = dataclasses.replace(config.atypical, weights=[str(find_weights(w)) for w in weights])
    if views:
        other_config.tta_views = views[0] if len(views) == 1 else list(views)
    if backend:
        other_config.backend = backend
    other = load_atypical(other_config, foundation=config.foundation)
    timings: dict[str, list[float]] = {"shipped": [], "compared": []}
    for run in range(repeats + 1):
        for name, classifier in (("shipped", shipped), ("compared", other)):
            seconds = time_stack(classifier, stack_path, config)
            if run:  # the first run of each warms up
                timings[name].append(seconds)
    shipped_s, other_s = (statistics.median(timings[k]) for k in ("shipped", "compared"))
    print(f"shipped: {len(shipped.models)} member(s), {shipped.member_views} views, backend "
          f"{shipped.models[0].backend}")
    print(f"compared with {', '.join(weights)} ({len(other.models)} member(s), {other.member_views} views, "
          f"backend {other.models[0].backend}, "
          f"threshold {other.threshold:.3f}): "
          f"16 pages, 1 thread, median of {repeats} alternating runs: shipped {shipped_s:.3f} s, compared "
          f"{other_s:.3f} s -> ratio {other_s / shipped_s:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large-pages", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for the large run (0: the CPUs this process may use, as "
                             "runtime.num_threads). 1 by default: on a shared machine more threads than free cores "
                             "make every OpenMP barrier wait")
    parser.add_argument("--compare-weights", nargs="+", default=None, metavar="WEIGHTS",
                        help="also time this atypical weights list (one file, or an ensemble's files) against the "
                             "shipped one on the 16-page stack, alternating runs, and print the ratio")
    parser.add_argument("--compare-tta-views", nargs="+", type=int, default=None, metavar="VIEWS",
                        help="the compared list's TTA views: one number, or one per file (default: the config's)")
    parser.add_argument("--compare-backend", choices=BACKENDS, default=None,
                        help="the compared list's atypical.backend (default: the config's, as the shipped one's)")
    args = parser.parse_args()
    factory = stack_factory()
    config = resolve_config()
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        weights, source = resolve_weights(config, scratch)
        config.atypical.weights = weights
        print(f"weights: {source}")
        print(f"machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, "
              f"torch {torch.__version__} with {torch.get_num_threads()} threads, load average "
              f"{', '.join(f'{v:.1f}' for v in psutil.getloadavg())}")
        print(f"config: tta={config.atypical.tta} ({config.atypical.tta_views} views), "
              f"batch_size={config.atypical.batch_size}, backend={config.atypical.backend}")

        started = time.perf_counter()
        classifier = load_atypical(config.atypical, foundation=config.foundation)
        load_s = time.perf_counter() - started
        model = classifier.models[0]
        print(f"model load: {load_s:.3f} s ({model.arch}, {model.input_size} px, {len(classifier.models)} member(s), "
              f"threshold {classifier.threshold:.3f})")

        small = factory.write_tiff(scratch / "stack16.tiff", factory.he_pages(16, size=128, seed=0))
        default_threads = torch.get_num_threads()
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            timings = [time_stack(classifier, small, config) for _ in range(args.repeats + 1)]
            median = statistics.median(timings[1:])
            print(f"16 pages, {threads} thread(s) (read + classify, after load): first {timings[0]:.3f} s, then "
                  f"median {median:.3f} s (min {min(timings[1:]):.3f}) over {args.repeats} runs "
                  f"-> target < 1 s: {'MET' if median < 1 else 'NOT MET'}")
        if args.compare_weights:
            compare_weights(config, args.compare_weights, small, args.repeats, args.compare_tta_views,
                            args.compare_backend)
        # run_track2 sets torch's threads from runtime.num_threads (midog.devices.configure_torch), whatever was
        # set here before: --threads goes through the config, or the run would use the config's count
        config.runtime.num_threads = args.threads or default_threads

        large_input = scratch / "large"
        size_mb = large_stack_input(large_input, args.large_pages).stat().st_size / 2**20
        rss_before = psutil.Process().memory_info().rss
        with PeakRss() as peak:
            started = time.perf_counter()
            run_track2(large_input, scratch / "out", config)
            large_s = time.perf_counter() - started
        entries = len(json.loads((scratch / "out" / TRACK2_FILENAME).read_text()))
        print(f"{args.large_pages} pages end to end, {torch.get_num_threads()} thread(s) ({size_mb:.0f} MiB stack, "
              f"{entries} entries out): {large_s:.1f} s "
              f"({1000 * large_s / args.large_pages:.1f} ms/page incl. model load), peak RSS "
              f"{peak.peak / 2**20:.0f} MiB (+{(peak.peak - rss_before) / 2**20:.0f} MiB over the "
              f"{rss_before / 2**20:.0f} MiB before the run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
