"""midog: MIDOG 2025 mitotic-figure detection (Track 1) and atypical classification (Track 2)."""

import os as _os
import tempfile as _tempfile

__version__ = "0.1.0"


def _private_yolo_config_dir() -> str:
    """A new folder for ultralytics' settings, private to this process (and the children it starts, which inherit
    the variable), removed when this process exits.

    A folder shared by a user's processes (it was `<temp>/midog-yolo-<uid>`) is state shared between runs:
    ultralytics writes its settings.json there without a lock or an atomic rename (at first import, whenever a
    setting changes, and again after reading a half-written file), it fills `runs_dir`, `weights_dir` and
    `datasets_dir` from the checkout of whichever process wrote the file first, and it keeps the DDP launcher's
    scripts there. So two test runs or trainings at once, or a fresh clone beside an older one, saw each other's
    settings. A private folder starts from ultralytics' defaults every time.
    """
    import atexit
    import shutil

    uid = _os.getuid() if hasattr(_os, "getuid") else 0
    owner = _os.getpid()
    prefix = f"midog-yolo-{uid}-"
    if _os.name == "posix":  # os.kill(pid, 0) probes a process only there (on Windows it ends it)
        _remove_orphans(_tempfile.gettempdir(), prefix)
    folder = _tempfile.mkdtemp(prefix=f"{prefix}{owner}-")  # mode 0700, a name no other process has

    def remove() -> None:
        if _os.getpid() == owner:  # not in a forked child that exits through Python
            shutil.rmtree(folder, ignore_errors=True)

    atexit.register(remove)
    return folder


def _remove_orphans(temp: str, prefix: str) -> None:
    """Remove the folders `_private_yolo_config_dir` made for processes that are gone without their exit handlers
    (killed, or ended with os._exit): each name holds its owner's process id."""
    import shutil

    try:
        names = [name for name in _os.listdir(temp) if name.startswith(prefix)]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            _os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(_os.path.join(temp, name), ignore_errors=True)
        except OSError:  # alive under another user, or not ours to probe
            pass


def _offline_defaults() -> None:
    """Keep third-party libraries off the network and out of the home folder, unless the environment says otherwise.

    Runs when any midog module is first imported, so before ultralytics or ONNX Runtime is: both act at import.
    - ultralytics probes DNS at import (`ONLINE`), and checks for updates and sends events when online:
      YOLO_OFFLINE=1 turns all of that off. It also writes its settings file (and any font it downloads) to its
      config folder, by default under the home folder, which is read-only in a container: YOLO_CONFIG_DIR moves it
      to a temporary folder of this process (`_private_yolo_config_dir`).
    - ONNX Runtime (the CPU detector backend) writes a device id and a telemetry database under ~/.cache at import:
      ORT_DISABLE_TELEMETRY=1.
    Set any of these variables yourself to keep your own value.
    """
    _os.environ.setdefault("YOLO_OFFLINE", "1")
    _os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    if not _os.environ.get("YOLO_CONFIG_DIR"):
        _os.environ["YOLO_CONFIG_DIR"] = _private_yolo_config_dir()
        _quiet_new_settings_note()


def _quiet_new_settings_note() -> None:
    """Drop ultralytics' "Creating new Ultralytics Settings" note (three lines on stdout): with a private settings
    folder every process creates them anew, so every run of process.py or a training printed it. A filter on
    ultralytics' logger, added before ultralytics configures that logger at import, which keeps filters; its other
    messages (training progress, warnings) pass."""
    import logging

    logging.getLogger("ultralytics").addFilter(
        lambda record: not str(record.msg).startswith("Creating new Ultralytics Settings"))


_offline_defaults()
