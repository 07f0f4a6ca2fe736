# The edge server, `edgeoffload serve`, as a container image (deploy/README.md: how to build it,
# make keys, run it and point devices at it).
#
# The build installs only from a wheelhouse in the build context, never from an index, so it
# needs no network and installs exactly the wheels that were built and checked on the host:
#
#   pip wheel -c constraints.txt --wheel-dir wheelhouse .     # edgeoffload + its runtime deps
#   docker build -t edgeoffload .                              # or: podman build
#
# (deploy/build_image.sh does both on machines that cannot pull images, with a local base.)
#
# The wheels must match the base's Python (CPython 3.11 on x86_64/aarch64 for the default base).

# Any Debian-like image with python3.11 and its venv module; the offline build passes a base made
# locally with debootstrap (deploy/build_image.sh).
ARG BASE=python:3.11-slim

# -- stage 1: install into a virtualenv ----------------------------------------------------------
# A separate stage, so that the wheelhouse (tens of MB) never becomes a layer of the final image.
FROM ${BASE} AS install
COPY wheelhouse/ /tmp/wheelhouse/
# A venv rather than the system site-packages: Debian's python3 refuses `pip install` outside
# one (PEP 668), and one path (/opt/edgeoffload) works the same on every base.
# No extras: the server runs tails with onnxruntime and needs no onnx, torch or transformers.
# pip and setuptools are removed afterwards: nothing installs at run time, and they are ~20 MB.
RUN python3 -m venv /opt/edgeoffload \
 && /opt/edgeoffload/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheelhouse \
        edgeoffload \
 && /opt/edgeoffload/bin/edgeoffload serve --help > /dev/null \
 && /opt/edgeoffload/bin/python -m pip uninstall --yes --quiet pip setuptools

# -- stage 2: the runtime image -------------------------------------------------------------------
FROM ${BASE}

# A fixed numeric uid, so that `USER` below is numeric (Kubernetes' runAsNonRoot can check it)
# and operators know whom to give the key files to: `chown -R 10001 keys/server`, since the
# server, like ssh, refuses a private key that others can read.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin edgeoffload \
 && mkdir -p /bundles /keys

# The venv's absolute paths (its bin/python links to the base's python3) stay valid because the
# same base image and the same path are used in both stages.
COPY --from=install /opt/edgeoffload /opt/edgeoffload
# PYTHONUNBUFFERED: log lines reach `docker logs` as they are written, not when a buffer fills.
# EDGEOFFLOAD_HEALTHCHECK_URL: the healthcheck's target. With port mapping the server listens on
# 8765 inside; only with host networking and another --port does it need changing
# (-e EDGEOFFLOAD_HEALTHCHECK_URL=http://127.0.0.1:PORT/healthz).
ENV PATH=/opt/edgeoffload/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    EDGEOFFLOAD_HEALTHCHECK_URL=http://127.0.0.1:8765/healthz

USER 10001:10001

# Mount points: bundles and keys come from the host, read-only (-v ./bundles:/bundles:ro); the
# image holds no model and no key. No VOLUME instruction: it would create an empty anonymous
# volume whenever a mount is forgotten, and the server's "does not exist" error is clearer.
EXPOSE 8765

# /healthz answers over plain HTTP beside the websocket. urllib, not curl: slim bases have no
# curl, and python is here anyway. urlopen raises on a refused connection or an HTTP error, so
# the exit status is the health. The start period covers loading the bundles.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['EDGEOFFLOAD_HEALTHCHECK_URL'], timeout=4)"]

# SIGTERM makes `edgeoffload serve` drain (finish in-flight requests, then exit 0), but run the
# container with an init (`docker run --init`, `podman run --init`, compose `init: true`): as
# PID 1, python ignores a SIGTERM that arrives before its handler is installed (while bundles
# load) and nothing reaps orphaned processes. Give `docker stop -t` more than the server's drain
# timeout (30 s) when requests can be long.
ENTRYPOINT ["edgeoffload", "serve"]
# Defaults: the bundle mounted at /bundles, the server key in /keys/server (keys generate), the
# allowed device keys in /keys/authorized_keys. 0.0.0.0 because inside a container 127.0.0.1 is
# not reachable from outside; publish the port only where devices can reach it. To serve several
# bundles, mount their parent at /bundles and pass `/bundles/a /bundles/b --key ... --allow ...`.
CMD ["/bundles", "--key", "/keys/server", "--allow", "/keys/authorized_keys", \
     "--host", "0.0.0.0", "--port", "8765"]
