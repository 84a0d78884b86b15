# The two commands of the README. Each creates or refreshes .venv itself; a second run reinstalls
# nothing (the stamp is newer than pyproject.toml).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mie-installed

.PHONY: quickstart test venv

venv: $(STAMP)

# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml: the only pair that imports on the
# project's machines (../shared/DESIGN.md).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q

# The README's first command: the whole pipeline on the embedded toy world, on the CPU (report.md at the end).
quickstart: venv
	$(VENV)/bin/mie quickstart
