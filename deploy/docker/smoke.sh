#!/usr/bin/env bash
# `make image-smoke`: the Docker image's install and build-time steps without a Docker engine.
# A fresh virtualenv in a directory outside the repo gets the built wheel through the image's own
# deploy/docker/install.sh; then, as a non-root user when we are root (the image runs as uid
# 10001), deploy/docker/build-steps.sh (model conversion, the profiles) and a demo handoff, from
# that directory. A file missing from the wheel, or a read of the source tree, fails here.
#   deploy/docker/smoke.sh WHEEL_DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
wheels=$(cd "$1" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/qkvcomm-image-smoke.XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
cp "$here/install.sh" "$here/build-steps.sh" "$here/../../constraints.txt" "$work/"
cp -r "$wheels" "$work/dist"

# The image's Python is a system one that any user can run; a pyenv Python under /root is not,
# so prefer the system python3 when there is one.
base=python3
if [ "$(id -u)" = 0 ] && [ -x /usr/bin/python3 ]; then base=/usr/bin/python3; fi
echo "image-smoke: install (deploy/docker/install.sh) into a fresh venv of $base in $work"
"$base" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
PYTHON="$work/venv/bin/python" sh "$work/install.sh" "$work/dist" "$work/constraints.txt"

mkdir "$work/home"
as_user=()
if [ "$(id -u)" = 0 ]; then
  id qkvsmoke >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin qkvsmoke
  chown qkvsmoke "$work/home"
  as_user=(runuser -u qkvsmoke --)
fi
run() {
  (cd "$work/home" && "${as_user[@]}" env -i HOME="$work/home" PATH="$work/venv/bin:/usr/bin:/bin" \
     LANG=C.UTF-8 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$@")
}
echo "image-smoke: build-time steps (deploy/docker/build-steps.sh) as $(run id -un)"
run sh "$work/build-steps.sh"
echo "image-smoke: demo handoff"
run qkvcomm demo | tee "$work/demo.txt"
grep -q "600" "$work/demo.txt" || { echo "image-smoke: the demo did not answer the rate limit (600)"; exit 1; }
echo "image-smoke: passed"
