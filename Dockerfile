# weightavg server image: `weightavg serve` on 0.0.0.0:50051 as a non-root user, CUDA when the base has it.
#
#   CUDA PyTorch base (the default):
#     DOCKER_BUILDKIT=1 docker build -t weightavg .
#   Any Debian/Ubuntu base (python3 is installed if missing), CPU torch wheel in wheels/, CA for pip:
#     DOCKER_BUILDKIT=1 docker build -t weightavg --build-arg BASE_IMAGE=local/debian:bookworm \
#         --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt .
#
# Build arguments:
#   BASE_IMAGE  the base. The default is PyTorch's CUDA runtime image; its torch is reused when it is
#               the pinned 2.13.0 (the venv sees the base's site-packages and pip keeps a satisfying
#               install), otherwise pip installs torch==2.13.0 into the venv. A base without python3
#               (plain Debian, e.g. one made with debootstrap) gets Debian's python3 and venv via apt.
#   WHEELS_DIR  a folder in the build context searched for wheels before the index (pip --find-links).
#               Put a CPU torch wheel there (`pip download torch==2.13.0 --no-deps -d wheels/` on a
#               machine whose pip finds the CPU build) to avoid pip fetching the multi-GB CUDA build.
#               Default `wheels`, which holds only a README unless you add wheels.
# Build secret:
#   ca          optional CA bundle for pip (and apt over https) behind a TLS-intercepting proxy:
#               --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt. Never stored in a layer.
#
# No `# syntax=` line: the Dockerfile frontend built into Docker 20.10+ (BuildKit) already supports
# RUN --mount, and naming a frontend image would need a registry.

ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime

FROM ${BASE_IMAGE} AS base
# Python with venv: present in the PyTorch images; installed from the distribution otherwise.
# Unpinned apt packages on purpose: the base decides the distribution release, and with it python3.
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca \
    if command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null; then exit 0; fi; \
    set -eu; \
    if [ -s /run/secrets/ca ]; then set -- -o Acquire::https::CAInfo=/run/secrets/ca; fi; \
    apt-get "$@" update -q; \
    DEBIAN_FRONTEND=noninteractive apt-get "$@" install -y -q --no-install-recommends python3 python3-venv; \
    rm -rf /var/lib/apt/lists/*

FROM base AS build
ARG WHEELS_DIR=wheels
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=180
COPY ${WHEELS_DIR} /tmp/wheels
# torch first, in its own layer, so that changing the server's code does not reinstall it.
# --system-site-packages lets the venv see a base image's torch; pip then keeps it if it is 2.13.0.
RUN --mount=type=secret,id=ca \
    set -eu; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    python3 -m venv --system-site-packages /opt/weightavg; \
    /opt/weightavg/bin/pip install -q --find-links /tmp/wheels 'torch==2.13.0'
# The package itself with the server extra, from the build context (.dockerignore keeps it small).
RUN --mount=type=secret,id=ca --mount=type=bind,target=/tmp/src,rw \
    set -eu; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    /opt/weightavg/bin/pip install -q --find-links /tmp/wheels '/tmp/src[server]'; \
    /opt/weightavg/bin/python -c 'import torch, weightavg_server; print("torch", torch.__version__)'

FROM base
COPY --from=build /opt/weightavg /opt/weightavg
# A fixed numeric uid, so volume permissions and `docker run --user` are predictable.
# /state: the state directory (--state-dir /state, as deploy/compose-cluster.yml runs it), the
# server's alone. A named volume mounted there starts as a copy of it, owner and mode included;
# without it in the image Docker makes the volume root's, 0755, where uid 10001 cannot write a
# snapshot (the server refuses to start on it).
RUN ( (command -v useradd >/dev/null && useradd --system --uid 10001 --user-group --create-home \
        --home-dir /home/weightavg --shell /usr/sbin/nologin weightavg) \
    || (echo 'weightavg:x:10001:10001::/home/weightavg:/usr/sbin/nologin' >> /etc/passwd \
        && echo 'weightavg:x:10001:' >> /etc/group && mkdir -p /home/weightavg \
        && chown 10001:10001 /home/weightavg)) \
    && mkdir -m 0700 /state && chown 10001:10001 /state
USER 10001:10001
WORKDIR /home/weightavg

# Inside a container the server must listen on every interface for a published port to reach it.
# Grace 8 s: shorter than `docker stop`'s default 10 s, so in-flight calls finish before SIGKILL.
ENV PATH=/opt/weightavg/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    WEIGHTAVG_HOST=0.0.0.0 \
    WEIGHTAVG_PORT=50051 \
    WEIGHTAVG_DEVICE=auto \
    WEIGHTAVG_GRACE_SECONDS=8
EXPOSE 50051

# The standard gRPC health service (grpc.health.v1): healthy while it answers SERVING; the server
# reports NOT_SERVING while draining after SIGTERM. A Python one-liner keeps it free of extra tools.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg; ch = grpc.insecure_channel('127.0.0.1:' + os.environ.get('WEIGHTAVG_PORT', '50051')); r = hg.HealthStub(ch).Check(h.HealthCheckRequest(service='weightavg.v1.WeightAveragingService'), timeout=4); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]

# Exec form: python is PID 1 and gets SIGTERM itself; the server handles it (drain, then exit 0).
STOPSIGNAL SIGTERM
ENTRYPOINT ["weightavg", "serve"]
CMD []
