# relicv2: set-up, tests and pipelines. Stages chain through manifest.json targets, so `make`
# reruns only what changed.
PY      := .venv/bin/python
RELICV2 := .venv/bin/relicv2
STAMP   := .venv/.installed
DEMO    := runs/demo

.PHONY: install test demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	.venv/bin/ruff check relicv2_cli tests bench

bench: $(STAMP)
	$(PY) -m bench.run_all

clean:
	rm -rf runs/demo .pytest_cache .ruff_cache build *.egg-info

# ---- demo: the whole pipeline on the embedded synthetic dataset --------------------------------
demo: $(STAMP)
	$(RELICV2) data info synthetic
	@echo "demo artifacts under $(DEMO):"
	@$(RELICV2) artifacts ls $(DEMO) 2>/dev/null || true
