# The two commands of the README:  make up  (set up + run the embedded default)  and  make test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ENV    ?= environments/local.yaml

.PHONY: setup system up down status test bench clean
setup: $(VENV)/.installed

# Debian packages the test suite uses: real sshd hosts in network namespaces, shellcheck for the
# provisioning steps, systemd (systemd-analyze verify and systemd --test) for the runtime's unit,
# prometheus and promtool for the generated scrape config, rules and dashboard queries, haproxy as
# the replicas' load balancer.
# Installed only when missing (needs root, as on CI).
SYSTEM_TOOLS := /usr/sbin/sshd /usr/bin/ssh-keyscan /usr/sbin/ip /usr/bin/shellcheck /usr/bin/systemd-analyze \
                /usr/bin/prometheus /usr/bin/promtool /usr/sbin/haproxy
system:
	@missing=""; for t in $(SYSTEM_TOOLS); do [ -x $$t ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    openssh-server openssh-client iproute2 shellcheck systemd prometheus haproxy >/dev/null; fi

# One venv with the runtime, the on-prem installer and the test tools. torch is pinned in
# pyproject.toml (an unpinned torch would pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

up: setup
	$(BIN)/herd up $(ENV)

down: setup
	$(BIN)/herd down $(ENV)

status: setup
	$(BIN)/herd status $(ENV)

test: setup system
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/serving.py --out bench/results/serving-$$(hostname).txt
	$(BIN)/python bench/weights.py --out bench/results/weights-$$(hostname).txt
	$(BIN)/python bench/generate.py --out bench/results/generate-$$(hostname).txt

clean:
	rm -rf $(VENV) .herd
