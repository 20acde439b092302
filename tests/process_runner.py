"""Run `process.py` as its own process, the way grand-challenge does, and collect its exit code, stdout and stderr.

Two ways, the same result:

- `run_cold`: `sys.executable process.py ...` in a fresh interpreter (optionally behind a command prefix such as
  `unshare -n`). This is the real thing, import-time side effects included, but each start imports torch, timm,
  ultralytics and ONNX Runtime again: 10-15 s on a 2-core CI machine.
- `WarmRunner.run`: `process.py` runs as `__main__` in a fresh child forked from an interpreter that has already
  imported those libraries (a zygote, as Android and multiprocessing's forkserver do). The child has its own exit
  code, environment, working directory and file descriptors 0/1/2 (so a C library writing to stderr is caught as it
  would be in a real run), but import-time side effects happened once, in the zygote: tests of those use
  `run_cold`. A case costs its real work only (about 1-3 s), which keeps a matrix of dozens of cases fast.

    python tests/process_runner.py --zygote MODULE...   # the zygote: one JSON request per line on stdin
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
PROCESS_PY = REPO_ROOT / "process.py"
WARM_MODULES = ("midog.cli", "midog.pipeline", "midog.proposals", "midog.yolo_modules", "ultralytics.nn.tasks",
                "onnxruntime")
"""What the zygote imports before it forks: everything a Track 1 or Track 2 run imports."""


@dataclass
class ProcessResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.replace("\r", "\n").splitlines() if line.strip()]


def base_env(home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: no inherited MIDOG_* settings, an empty home, unbuffered output."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "PYTHONUNBUFFERED": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def process_args(input_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--input", str(input_dir), "--output", str(output_dir), *extra]


def run_cold(args: Sequence[str], env: Mapping[str, str], cwd: Path, prefix: Sequence[str] = (),
             timeout: float = 300) -> ProcessResult:
    """`[*prefix] sys.executable process.py *args` in a fresh interpreter."""
    result = subprocess.run([*prefix, sys.executable, str(PROCESS_PY), *args], cwd=cwd, env=dict(env),
                            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return ProcessResult(result.returncode, result.stdout, result.stderr)


class WarmRunner:
    """A zygote process that forks one child per `run`; close it (or use it as a context manager)."""

    def __init__(self, env: Mapping[str, str], modules: Sequence[str] = WARM_MODULES, timeout: float = 300) -> None:
        self._scratch = tempfile.TemporaryDirectory(prefix="midog-zygote-")
        self._count = 0
        self._log = Path(self._scratch.name) / "zygote.log"
        with open(self._log, "w") as log:  # the zygote's own stdout and stderr: whatever the imports print
            self._zygote = subprocess.Popen([sys.executable, __file__, "--zygote", *modules], cwd=REPO_ROOT,
                                            env={**env, "PYTHONPATH": str(REPO_ROOT)}, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, text=True)
        ready = self._read_reply(timeout)
        if ready != {"ready": True}:
            raise RuntimeError(f"the zygote did not start: {ready}")

    def run(self, args: Sequence[str], env: Mapping[str, str], cwd: Path, timeout: float = 300) -> ProcessResult:
        self._count += 1
        stdout = Path(self._scratch.name) / f"{self._count}.out"
        stderr = Path(self._scratch.name) / f"{self._count}.err"
        request = {"args": list(args), "env": dict(env), "cwd": str(cwd), "stdout": str(stdout),
                   "stderr": str(stderr), "timeout": timeout}
        assert self._zygote.stdin is not None
        self._zygote.stdin.write(json.dumps(request) + "\n")
        self._zygote.stdin.flush()
        reply = self._read_reply(timeout + 30)
        return ProcessResult(int(reply["returncode"]), stdout.read_text(errors="replace"),
                             stderr.read_text(errors="replace"))

    def _read_reply(self, timeout: float) -> dict:
        assert self._zygote.stdout is not None
        line = self._zygote.stdout.readline()
        if not line:
            self._zygote.wait(timeout)
            raise RuntimeError(f"the zygote exited with {self._zygote.returncode}: {self._log.read_text()[-2000:]}")
        return json.loads(line)

    def close(self) -> None:
        if self._zygote.poll() is None:
            self._zygote.kill()  # it holds nothing worth an orderly (and slow) interpreter shutdown
            self._zygote.wait()
        for stream in (self._zygote.stdin, self._zygote.stdout):
            if stream is not None:
                stream.close()
        self._scratch.cleanup()

    def __enter__(self) -> "WarmRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the zygote ----------------------------------------------------------------------------------------------------

def _exit_code(exit: SystemExit) -> int:
    """What the interpreter does with a SystemExit that reaches the top."""
    if exit.code is None:
        return 0
    if isinstance(exit.code, int):
        return exit.code
    print(exit.code, file=sys.stderr)
    return 1


def _child(request: dict, protocol: int) -> None:
    """Become `python process.py ARGS` in the requested directory and environment; never returns."""
    import runpy

    code = 1
    try:
        os.close(protocol)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [str(PROCESS_PY), *request["args"]]
        sys.path[0] = str(PROCESS_PY.parent)
        try:
            runpy.run_path(str(PROCESS_PY), run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = _exit_code(exit)
        except BaseException:
            sys.excepthook(*sys.exc_info())  # what the interpreter prints for an uncaught exception
            code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.02)


def _zygote(modules: Sequence[str]) -> None:
    import importlib

    protocol = os.fdopen(os.dup(1), "w")  # replies go here; fd 1 (what the imports print) joins the log on fd 2
    os.dup2(2, 1)
    for module in modules:
        importlib.import_module(module)
    protocol.write(json.dumps({"ready": True}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request, protocol.fileno())
        protocol.write(json.dumps({"returncode": _wait(pid, float(request["timeout"]))}) + "\n")
        protocol.flush()


if __name__ == "__main__":
    if sys.argv[1:2] != ["--zygote"]:
        raise SystemExit(__doc__)
    _zygote(sys.argv[2:])
