# MIDOG 2025 algorithm container (grand-challenge style): Track 1 and Track 2, picked from /input/inputs.json.
#   ./build.sh && ./test.sh && ./export.sh       (see docs/container.md)
# Built for linux/amd64, what grand-challenge runs: the FROM line pins it (a plain `docker build .` on an arm64 Mac
# too), and build.sh passes --platform=linux/amd64 to docker build.
# The base image provides the CUDA build of torch/torchvision; its tag must carry the torch version pinned in
# requirements.txt (the build stops otherwise).
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda12.8-cudnn9-runtime
FROM --platform=linux/amd64 ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    YOLO_OFFLINE=1 \
    YOLO_CONFIG_DIR=/tmp/Ultralytics \
    MPLCONFIGDIR=/tmp/matplotlib \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    TORCH_HOME=/tmp/torch

# opencv (pulled in by ultralytics) needs libGL and glib at import time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

# Dependencies first (cached layer). torch/torchvision stay the base image's CUDA build: they are left out of the
# install and pinned by a constraints file, and the build fails if the base image has another torch version.
COPY requirements.txt /tmp/requirements.txt
RUN python -c "import sys, torch, torchvision; want = [l.split('==')[1].strip() for l in open('/tmp/requirements.txt') if l.startswith('torch==')][0]; have = torch.__version__.split('+')[0]; sys.exit(0 if have == want else f'base image has torch {have}, requirements.txt pins {want}: pick a matching BASE_IMAGE')" \
 && python -c "import torch, torchvision; print(f'torch=={torch.__version__}'); print(f'torchvision=={torchvision.__version__}')" > /tmp/constraints.txt \
 && grep -vE '^(torch|torchvision)==' /tmp/requirements.txt > /tmp/requirements-no-torch.txt \
 && python -m pip install --no-cache-dir -r /tmp/requirements-no-torch.txt -c /tmp/constraints.txt \
 && rm /tmp/requirements*.txt /tmp/constraints.txt

RUN groupadd -r user && useradd -m --no-log-init -r -g user user \
 && mkdir -p /opt/app /opt/ml/model /input /output \
 && chown user:user /opt/app /output

USER user
WORKDIR /opt/app

# Only what runs: the entrypoint, the package (with its shipped config), the shipped weights.
# Weights in /opt/ml/model (the grand-challenge model tarball) override those in weights/.
COPY --chown=user:user process.py /opt/app/
COPY --chown=user:user midog /opt/app/midog
COPY --chown=user:user weights /opt/app/weights
# The ONNX Runtime exports of the shipped models, written beside them once here rather than by every fresh container
# (every grand-challenge job): `python -m midog.export_onnx` loads both tracks' models as process.py does.
RUN python -m midog.export_onnx

ENTRYPOINT ["python", "process.py"]
