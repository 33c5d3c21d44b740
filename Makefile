# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision first, pinned to the builds this machine's pip serves from local disk; setup.cfg
# declares ranges, so any compatible torch works elsewhere.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo bench clean

# The example plugin, the shipped pretrained model (sat-flickr8k, the default of `capkit caption`) and the
# torch-free ONNX runtime (capkit-onnx) are installed too (one pip command, so capkit-captioning resolves to this
# checkout) and their tests run with the core's; their setup.cfg files hold their entry points and
# dependencies, which only a reinstall updates.
$(VENV)/.installed: setup.cfg pyproject.toml plugins/capkit-adaptive/setup.cfg plugins/capkit-adaptive/pyproject.toml \
		plugins/capkit-sat-flickr8k/setup.cfg plugins/capkit-onnx/setup.cfg plugins/capkit-onnx/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[all,dev]' -e plugins/capkit-adaptive -e plugins/capkit-sat-flickr8k \
		-e plugins/capkit-onnx
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) tools/train.py configs/demo.yaml --overwrite

bench: install
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info plugins/*/*.egg-info
