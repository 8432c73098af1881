#!/bin/sh
# The image's build-time steps, also replayed by `make image-smoke`: convert the embedded model
# and calibrate its codec and layer-selection profiles now, so a container serves in seconds.
set -eu
qkvcomm calibrate codec --device cpu
qkvcomm calibrate layers --device cpu
