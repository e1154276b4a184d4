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

# Benchmarks print tables and write bench/results/*; real-data ones read RELICV2_DATA. `make bench`
# runs them all (about two hours on 2 CPU cores); `make bench-NAME` runs bench/bench_NAME.py alone.
# lightly (the `bench` extra) is installed for them only.
export RELICV2_DATA ?= $(wildcard ../shared/data)
BENCH_STAMP := .venv/.bench-installed
BENCHES := saliency saliency_stream pretrain throughput eval quality distributed negatives decode learning memory

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

.PHONY: $(addprefix bench-,$(BENCHES))
bench: $(addprefix bench-,$(BENCHES))

$(addprefix bench-,$(BENCHES)): bench-%: $(BENCH_STAMP)
	@echo "== bench/bench_$*.py"
	$(PY) bench/bench_$*.py

clean:
	rm -rf runs/demo .pytest_cache .ruff_cache build *.egg-info

# ---- demo: the whole pipeline on the embedded synthetic dataset --------------------------------
# Sized to finish in a few minutes on 2 CPU cores and still show learning: 3,000 training images at
# 16 px, 8 epochs (368 steps of batch 64) of a quarter-width ResNet-18 with two 16 px crops per image.
# RELICv2 ends well above the random-init encoder in kNN and linear top-1 (docs/data.md).
DATA  := synthetic --limit-train 3000 --limit-test 1000 --image-size 16
NET   := --arch resnet18 --width 0.25 --stem cifar
TRAIN := $(NET) --large-size 16 --small-crops 0 --proj-hidden 1024 --proj-dim 128 --batch-size 64 --epochs 8 \
         --warmup-epochs 0.5 --optimizer lars --lr 1.0 --weight-decay 1e-5 --ema-base 0.96 --eval-every 0
RUN   := $(RELICV2)
W     := --workdir $(DEMO) --force --quiet
ENCODERS := $(DEMO)/pretrain/relicv2 $(DEMO)/pretrain/byol $(DEMO)/pretrain/supervised

demo: $(STAMP) $(DEMO)/linear/random/manifest.json $(DEMO)/semi/relicv2/manifest.json \
      $(DEMO)/transfer/demo/manifest.json $(DEMO)/neighbors/demo/manifest.json $(DEMO)/ratios/demo/manifest.json
	@$(RELICV2) report $(DEMO)
	@$(RELICV2) artifacts ls $(DEMO)
	@echo "demo artifacts under $(DEMO)/ (relicv2 artifacts lineage $(DEMO)/linear/relicv2 shows the chain)"

$(DEMO)/saliency/synthetic/manifest.json: $(STAMP)
	$(RUN) saliency $(DATA) $(W) --name synthetic

$(DEMO)/pretrain/relicv2/manifest.json: $(DEMO)/saliency/synthetic/manifest.json
	$(RUN) pretrain $(DATA) $(TRAIN) --method relicv2 --saliency $(DEMO)/saliency/synthetic $(W) --name relicv2

$(DEMO)/pretrain/%/manifest.json: $(STAMP)
	$(RUN) pretrain $(DATA) $(TRAIN) --method $* $(W) --name $*

$(DEMO)/linear/%/manifest.json: $(DEMO)/pretrain/%/manifest.json
	$(RUN) eval linear $(DEMO)/pretrain/$* $(DATA) $(W) --name $*

$(DEMO)/linear/random/manifest.json: $(foreach e,relicv2 byol supervised,$(DEMO)/linear/$(e)/manifest.json)
	$(RUN) eval linear random:resnet18 $(DATA) $(NET) $(W) --name random

$(DEMO)/semi/relicv2/manifest.json: $(DEMO)/pretrain/relicv2/manifest.json
	$(RUN) eval semi $(DEMO)/pretrain/relicv2 $(DATA) --fraction 0.1 --epochs 10 $(W) --name relicv2

$(DEMO)/transfer/demo/manifest.json: $(ENCODERS:%=%/manifest.json)
	$(RUN) eval transfer $(ENCODERS) synthetic --seed 1 --limit-train 1000 --limit-test 500 --image-size 16 $(W) --name demo

$(DEMO)/neighbors/demo/manifest.json: $(ENCODERS:%=%/manifest.json)
	$(RUN) analyze neighbors $(ENCODERS) random:resnet18 $(DATA) $(NET) --per-class 20 $(W) --name demo

$(DEMO)/ratios/demo/manifest.json: $(ENCODERS:%=%/manifest.json)
	$(RUN) analyze ratios $(ENCODERS) random:resnet18 $(DATA) $(NET) $(W) --name demo
