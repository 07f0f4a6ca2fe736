#!/usr/bin/env bash
# Build the edge-server image offline, as CI and tests/test_container.py do:
#
#   1. a base image localhost/edgeoffload-base:bookworm (Debian bookworm minbase + python3.11 +
#      venv), made with debootstrap from the Debian mirror apt is configured with, unless it
#      exists already: no registry but PyPI and Debian is reachable from these machines;
#   2. a wheelhouse of edgeoffload (from this checkout) and its runtime dependencies, built with
#      the host's pip, which trusts the machine's TLS proxy (pip inside a build does not);
#   3. the image, with buildah from the repository's Dockerfile and that base.
#
# Usage: deploy/build_image.sh [IMAGE]          (default localhost/edgeoffload:test)
# Environment: PYTHON (host python3.11 for pip, default python3), EDGEOFFLOAD_BUILD_DIR (build
# context, default $TMPDIR/edgeoffload-image; kept outside the checkout so that a build never
# writes into it). Needs root, podman, buildah, runc and debootstrap
# (apt-get install podman buildah runc debootstrap). Prints progress; exits non-zero with a
# message naming the step that failed.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
image=${1:-localhost/edgeoffload:test}
base=localhost/edgeoffload-base:bookworm
suite=bookworm # its python3 is 3.11, the version constraints.txt is tested with
python=${PYTHON:-python3}
context=${EDGEOFFLOAD_BUILD_DIR:-${TMPDIR:-/tmp}/edgeoffload-image}
# This machine class needs runc, cgroupfs and lower ulimits (see the file); pointing every
# podman/buildah call at it, rather than editing /etc, makes CI, the test and a developer agree.
export CONTAINERS_CONF="$repo/deploy/containers.conf"

step() { echo "build_image: $*"; }
fail() {
  echo "build_image: error: $*" >&2
  exit 1
}
started=$(date +%s)

for tool in podman buildah runc debootstrap tar; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (apt-get install -y podman buildah runc debootstrap)"
done
[ "$(id -u)" -eq 0 ] || fail "run as root: debootstrap and rootful podman/buildah need it"
py_version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])') ||
  fail "cannot run $python; set PYTHON to a python3.11"
# The wheels are built for the host's interpreter and installed into the image's python3.11.
[ "$py_version" = "3.11" ] || fail "$python is Python $py_version; the image runs 3.11, so set PYTHON to a python3.11 (its wheels must match)"

# The mirror apt uses for $suite: the first enabled `deb` source (deb822 .sources files or
# one-line .list files) whose suites include it. Nothing else is reachable, so no fallback URL.
debian_mirror() {
  "$python" - "$suite" <<'EOF'
import glob
import sys

suite = sys.argv[1]
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in open(path).read().split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if ":" in line and not line.startswith(("#", " ", "\t")):
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.split()
        if (
            "deb" in fields.get("types", [])
            and suite in fields.get("suites", [])
            and fields.get("enabled", ["yes"]) != ["no"]
            and fields.get("uris")
        ):
            print(fields["uris"][0])
            sys.exit(0)
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except FileNotFoundError:
        continue
    for line in lines:
        words = line.split("#", 1)[0].split()
        if words[:1] == ["deb"]:
            words = [w for w in words[1:] if not w.startswith("[")]  # drop [options]
            if len(words) >= 2 and words[1] == suite:
                print(words[0])
                sys.exit(0)
sys.exit(1)
EOF
}

# -- 1. base image ----------------------------------------------------------------------------
if podman image exists "$base"; then
  step "base image $base exists (podman rmi $base to remake it)"
else
  mirror=$(debian_mirror) || fail "no 'deb' source for $suite in /etc/apt/sources.list{,.d/*}; configure apt first"
  rootfs=$(mktemp -d "${TMPDIR:-/tmp}/edgeoffload-rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  step "debootstrap $suite (minbase + python3, python3-venv) from $mirror"
  # passwd: useradd for the image's non-root user; ca-certificates: TLS to anything a
  # deployment adds later. Its log goes to a file: on failure, its tail is shown.
  if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
    "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
    tail -n 20 "$rootfs.log" >&2
    fail "debootstrap failed (full log: $rootfs.log)"
  fi
  rm -f "$rootfs.log"
  # Package lists, downloaded .debs, docs, man pages and translations are of no use to a
  # server image (as in Debian's own slim images).
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
  step "podman import -> $base"
  tar --numeric-owner -C "$rootfs" -c . | podman import --quiet - "$base" >/dev/null ||
    fail "podman import failed"
  rm -rf "$rootfs"
  trap - EXIT
fi

# -- 2. wheelhouse ----------------------------------------------------------------------------
# pip builds a local project in its source folder (build/, *.egg-info); a copy of the package's
# sources keeps the shared checkout untouched.
rm -rf "$context"
mkdir -p "$context/wheelhouse" "$context/src"
tar -C "$repo" --exclude=__pycache__ -cf - pyproject.toml README.md edgeoffload converters |
  tar -C "$context/src" -xf -
step "pip wheel edgeoffload + runtime dependencies -> $context/wheelhouse"
# -c constraints.txt: the versions CI tests with. No extras: the server needs no onnx or torch.
if ! "$python" -m pip wheel --quiet -c "$repo/constraints.txt" --wheel-dir "$context/wheelhouse" \
  "$context/src" >"$context/pip.log" 2>&1; then
  tail -n 20 "$context/pip.log" >&2
  fail "pip wheel failed (full log: $context/pip.log)"
fi
rm -rf "$context/src"
step "wheelhouse: $(find "$context/wheelhouse" -name '*.whl' | wc -l) wheels, $(du -sh "$context/wheelhouse" | cut -f1)"

# -- 3. image ---------------------------------------------------------------------------------
cp "$repo/.dockerignore" "$context/.dockerignore" # buildah reads it from the context folder
old_id=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
step "buildah bud -> $image (base $base)"
# --isolation chroot: no user namespaces or cgroup setup needed for RUN steps on this host.
# --network host: nothing downloads during the build, and it needs no network plumbing.
# --format docker: the OCI image format has no HEALTHCHECK; buildah would drop it.
# No --layers: the wheelhouse changes with every build (fresh wheel files), so cached layers
# would save nothing and leave ~0.5 GB of intermediate images behind per build.
if ! buildah bud --quiet --isolation chroot --network host --format docker \
  --build-arg "BASE=$base" -f "$repo/Dockerfile" -t "$image" "$context" >"$context/build.log" 2>&1; then
  tail -n 30 "$context/build.log" >&2
  fail "buildah bud failed (full log: $context/build.log)"
fi
new_id=$(podman image inspect --format '{{.Id}}' "$image")
# The previous build of this tag would linger untagged; drop it unless a container uses it.
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
  podman rmi "$old_id" >/dev/null 2>&1 || true
fi
size=$(podman image inspect --format '{{.Size}}' "$image")
step "built $image ($((size / 1000000)) MB) in $(($(date +%s) - started)) s"
