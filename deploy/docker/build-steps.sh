#!/bin/sh
# The image's build-time steps, also replayed by `make image-smoke`: convert the embedded model now
# and make sure its codec and layer-selection profiles are there (shipped with the package, so
# --reuse measures nothing), so a container serves in seconds.
set -eu
qkvcomm calibrate codec --reuse --device cpu
qkvcomm calibrate layers --reuse --device cpu
