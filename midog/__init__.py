"""midog: MIDOG 2025 mitotic-figure detection (Track 1) and atypical classification (Track 2)."""

import os as _os
import tempfile as _tempfile

__version__ = "0.1.0"


def _offline_defaults() -> None:
    """Keep third-party libraries off the network and out of the home folder, unless the environment says otherwise.

    Runs when any midog module is first imported, so before ultralytics or ONNX Runtime is: both act at import.
    - ultralytics probes DNS at import (`ONLINE`), and checks for updates and sends events when online:
      YOLO_OFFLINE=1 turns all of that off. It also writes its settings file (and any font it downloads) to its
      config folder, by default under the home folder, which is read-only in a container: YOLO_CONFIG_DIR moves it
      under the temp folder.
    - ONNX Runtime (the CPU detector backend) writes a device id and a telemetry database under ~/.cache at import:
      ORT_DISABLE_TELEMETRY=1.
    Set any of these variables yourself to keep your own value.
    """
    _os.environ.setdefault("YOLO_OFFLINE", "1")
    _os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    uid = _os.getuid() if hasattr(_os, "getuid") else 0
    _os.environ.setdefault("YOLO_CONFIG_DIR", _os.path.join(_tempfile.gettempdir(), f"midog-yolo-{uid}"))


_offline_defaults()
