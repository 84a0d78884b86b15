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

# Until the quickstart stage lands: the toy world, built into shards for every corpus format.
quickstart: venv
	$(VENV)/bin/mie shards toy
	for c in twitter gmner mnre jmere newsclippings; do $(VENV)/bin/mie shards build configs/shards/toy/$$c.toml || exit 1; done
