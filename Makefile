# Two entry points (see README): `make demo` runs the main job (the default `hsa-train`), `make test`
# runs the test suite. `make parity` checks every golden model fixture with hsa-compare.
# Both create .venv with Python 3.12 on first use and install the package with its test extras.
VENV := .venv
PY := $(VENV)/bin/python
FIXTURES ?= $(if $(wildcard ../shared/fixtures),../shared/fixtures,tests/golden)

.PHONY: setup demo test parity clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || "$$(bash .ci/find_python312.sh)" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/hsa-train

parity: setup
	@for ref in $(FIXTURES)/swa_hsa/model_*.npz $(FIXTURES)/drt/drt_model_*.npz; do \
	  case $$ref in */drt/*) type=drt;; *) type=swa_hsa;; esac; \
	  $(VENV)/bin/hsa-compare --model-type $$type --config $${ref%.npz}.config.json --reference $$ref || exit 1; \
	done
	@for dec in $(FIXTURES)/swa_hsa/decode_*.npz; do \
	  model=$$(echo $$dec | sed 's/decode_/model_/'); \
	  $(VENV)/bin/hsa-compare --model-type swa_hsa --config $${model%.npz}.config.json --reference $$model --decode $$dec || exit 1; \
	done

test: setup
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -n 2 -q tests

clean:
	rm -rf $(VENV) build *.egg-info
