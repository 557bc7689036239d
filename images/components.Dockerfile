# The image every pipeline step runs in: the captioner library, its CLI and the KFP components.
# GPU nodes: build with --build-arg TF_EXTRA=and-cuda (CUDA and cuDNN come as pip wheels; the node
# provides the NVIDIA driver). The default is the CPU build.
FROM python:3.11-slim-bookworm

ARG TF_EXTRA=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KERAS_HOME=/opt/keras \
    CAPTIONER_CACHE=/tmp/captioner-cache \
    TF_CPP_MIN_LOG_LEVEL=2

# Java runs the COCO evaluation's PTB tokenizer and METEOR.
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless=17.* \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/captioner
COPY pyproject.toml setup.cfg constraints.txt README.md ./
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
RUN pip install -c constraints.txt ".[pipeline]" \
    && if [ -n "$TF_EXTRA" ]; then pip install -c constraints.txt "tensorflow[${TF_EXTRA}]==2.21.0"; fi

# ImageNet weights for the default backbone go into $KERAS_HOME/models at build time when present in
# the build context (weights/), so that steps never download at run time.
COPY images/weights/ /opt/keras/models/

RUN useradd --create-home --uid 1000 captioner
USER 1000
ENTRYPOINT ["captioner"]
