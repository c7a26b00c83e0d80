# One image for both roles; they differ only in the command:
#   docker run IMAGE          -> API (migrates, then uvicorn on $PORT, default 8000)
#   docker run IMAGE worker   -> Celery worker on the `training` queue
#   docker run IMAGE background -> Celery worker on the `ingest` and `exports` queues
#   docker run IMAGE visiontune migrate   -> any other command runs as given
#
# PyPI's Linux torch wheels carry their own CUDA libraries, so the same image trains on an
# NVIDIA GPU when the container is given one (host driver + NVIDIA Container Toolkit) and on
# the CPU otherwise. For a smaller CPU-only image build with
#   --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# (the pins in constraints.txt still apply: torch==X matches X+cpu).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder

ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml, constraints.txt
# or the client SDK (clients/python: the `visiontune` command and its dependency of this repo) change,
# not on every source edit.
COPY pyproject.toml constraints.txt ./
COPY clients/python ./clients/python
RUN pip install --no-cache-dir -c constraints.txt ./clients/python \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt

# Then the project itself (a regular, non-editable install into the venv).
COPY app ./app
COPY workers ./workers
# The console's charting library, pinned and checked, from the npm registry (not committed).
RUN python -m app.console.vendor && pip install --no-cache-dir -c constraints.txt .


FROM ${PYTHON_IMAGE}

ARG UID=1000
ARG GID=1000

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VISIONTUNE_DATA_DIR=/data \
    HF_HOME=/data/cache/huggingface \
    TORCH_HOME=/data/cache/torch \
    PORT=8000

RUN groupadd --gid "${GID}" visiontune \
    && useradd --uid "${UID}" --gid visiontune --create-home --home-dir /home/visiontune \
       --shell /usr/sbin/nologin visiontune \
    && mkdir -p /data /weights \
    && chown visiontune:visiontune /data

COPY --from=builder /opt/venv /opt/venv
COPY --chmod=0755 docker/entrypoint.sh /app/docker/entrypoint.sh

WORKDIR /app
# Numeric, so that runtimes can check it is not root without reading /etc/passwd.
USER ${UID}:${GID}

# Datasets, trained models, job checkpoints, the SQLite database and the hub cache. A named
# volume mounted here starts out owned by the visiontune user (the ownership set above).
VOLUME ["/data"]
# /weights is an optional mount point for local pretrained weights
# (<architecture>[.<tag>].safetensors). VISIONTUNE_WEIGHTS_DIR is deliberately not set here:
# set VISIONTUNE_WEIGHTS_DIR=/weights only when something is mounted there, e.g.
#   -v "$PWD/weights:/weights:ro" -e VISIONTUNE_WEIGHTS_DIR=/weights

EXPOSE 8000

# /healthz only says the API process is up. python rather than curl (slim has no curl), and
# http.client rather than urllib so that an HTTP(S)_PROXY in the environment is never used.
# The worker serves no HTTP: docker-compose.yml disables this check for it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import http.client, os, sys; c = http.client.HTTPConnection('127.0.0.1', int(os.environ.get('PORT', '8000')), timeout=4); c.request('GET', '/healthz'); sys.exit(0 if c.getresponse().status == 200 else 1)"]

ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["api"]
