# The two commands of the README: `make demo` and `make test`. Everything installs into a
# project-local .venv, pinned by constraints.txt, so a fresh machine gets the tested versions.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: demo demo-learning test test-stats lint typecheck unit protos check-protos bench bench-scale install clean system-deps deploy-tools

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP) system-deps

# nginx is the mutual-TLS proxy in front of Flower's Fleet API (protocols/nginx_proxy.py,
# docs/training.md "Closing the Control API"); Debian's nginx-light is enough.
NGINX_INSTALL := env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light
# Debian's Chromium and its matching chromedriver drive the `chc ui` browser tests
# (tests/browser/); Selenium is pointed at these two paths so it never downloads a browser.
CHROMIUM_INSTALL := env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	chromium chromium-driver
# Validators of deploy/ outside pip (tests/deploy/): systemd-analyze (Debian's systemd) for
# the units, shellcheck for the compose bootstrap script. The rest come from the dev extra.
DEPLOY_TOOLS_INSTALL := env DEBIAN_FRONTEND=noninteractive apt-get install -y \
	--no-install-recommends systemd shellcheck
deploy-tools:
	@command -v systemd-analyze >/dev/null && command -v shellcheck >/dev/null || { \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; \
		elif command -v sudo >/dev/null; then SUDO=sudo; \
		else echo "systemd-analyze or shellcheck is missing and this is not root (no sudo):" \
			"install systemd and shellcheck (apt-get install systemd shellcheck) and run make" \
			"again" >&2; exit 1; fi; \
		command -v apt-get >/dev/null || { echo "systemd-analyze or shellcheck is missing and" \
			"there is no apt-get: install systemd and shellcheck, then run make again" >&2; \
			exit 1; }; \
		$$SUDO $(DEPLOY_TOOLS_INSTALL) || ($$SUDO apt-get update && \
			$$SUDO $(DEPLOY_TOOLS_INSTALL)) || { echo "could not install systemd and shellcheck" \
			"with apt-get: install them by hand and run make again" >&2; exit 1; }; \
	}

system-deps: deploy-tools
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; \
		elif command -v sudo >/dev/null; then SUDO=sudo; \
		else echo "nginx is missing and this is not root (no sudo): install nginx-light" \
			"(apt-get install nginx-light) and run make again" >&2; exit 1; fi; \
		command -v apt-get >/dev/null || { echo "nginx is missing and there is no apt-get:" \
			"install nginx (1.22 or later, with the ssl and proxy modules) and run make again" >&2; \
			exit 1; }; \
		$$SUDO $(NGINX_INSTALL) || ($$SUDO apt-get update && $$SUDO $(NGINX_INSTALL)) || { \
			echo "could not install nginx-light with apt-get: install it by hand and run" \
				"make again" >&2; exit 1; }; \
	}
	@test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || { \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; \
		elif command -v sudo >/dev/null; then SUDO=sudo; \
		else echo "chromium or chromedriver is missing and this is not root (no sudo): install" \
			"chromium and chromium-driver (apt-get install chromium chromium-driver) and run" \
			"make again" >&2; exit 1; fi; \
		command -v apt-get >/dev/null || { echo "chromium or chromedriver is missing and there" \
			"is no apt-get: install Chromium at /usr/bin/chromium and its matching" \
			"chromedriver at /usr/bin/chromedriver, then run make again" >&2; exit 1; }; \
		$$SUDO $(CHROMIUM_INSTALL) || ($$SUDO apt-get update && $$SUDO $(CHROMIUM_INSTALL)) || { \
			echo "could not install chromium and chromium-driver with apt-get: install them" \
				"by hand and run make again" >&2; exit 1; }; \
	}

demo: $(STAMP)
	$(BIN)/chc demo $(ARGS)

demo-learning: $(STAMP)
	$(BIN)/chc demo --learning $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache --no-logo

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck unit

# The statistical contract alone (every estimator's 95% coverage, tests/stats; about two
# minutes on two cores): `make test` runs it too, so CI always does.
test-stats: $(STAMP)
	$(BIN)/python -m pytest tests/stats $(PYTEST_ARGS)

# Regenerate the committed protobuf/gRPC stubs (with grpcio-tools 1.81, pinned in constraints.txt: its output runs on the pinned protobuf).
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=. \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=. \
		protocols/v1/node.proto protocols/v1/hub.proto protocols/v1/link.proto

check-protos: protos
	git diff --exit-code -- protocols/v1 || \
		(echo "generated stubs differ from protocols/v1/*.proto: run 'make protos' and commit"; exit 1)

# Each script prints one JSON object; ARGS goes to the federated count benchmark,
# LEDGER_ARGS to the ledger one (e.g. LEDGER_ARGS="--dir /var/lib/chc" to time that disk),
# GLM_ARGS to the model fit one (e.g. GLM_ARGS="--persons 50000" for a quick run).
bench: $(STAMP)
	$(BIN)/python -m bench.federated_count $(ARGS)
	$(BIN)/python -m bench.signing
	$(BIN)/python -m bench.ledger $(LEDGER_ARGS)
	$(BIN)/python -m bench.synth
	$(BIN)/python -m bench.node_startup
	$(BIN)/python -m bench.median
	$(BIN)/python -m bench.glm $(GLM_ARGS)
	$(BIN)/python -m bench.present
	$(BIN)/python -m bench.ledger_relay

# Issue 16's goals, each against its baseline in the same run (README, "Benchmarks"); about
# 20 minutes in all (FANOUT_ARGS="--nodes 1,10,30" for a shorter fan-out run).
bench-scale: $(STAMP)
	$(BIN)/python -m bench.query_engine --persons-per-node 10000 --accuracy-runs 1
	$(BIN)/python -m bench.query_engine --persons-per-node 100000 --accuracy-runs 1
	$(BIN)/python -m bench.single_site
	$(BIN)/python -m bench.pooling
	$(BIN)/python -m bench.fanout $(FANOUT_ARGS)
	$(BIN)/python -m bench.load

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
