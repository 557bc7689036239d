# The REST gateway (Flask; gunicorn worker processes whose connections waitress reads, so slow clients
# hold no thread). `captioner serve --backend tfserving` talks to TF Serving; `--backend local` serves
# SavedModels in-process from a mounted or gs:// model repository. In Kubernetes an nginx sidecar
# fronts it (serving/deploy/k8s/gateway.yaml).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2

WORKDIR /opt/captioner
COPY pyproject.toml setup.cfg constraints.txt README.md ./
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
RUN pip install -c constraints.txt ".[serve]"

USER 1000
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/health')"]
ENTRYPOINT ["captioner"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--workers", "2"]
