# Every target sets up .venv on first use: a fresh clone needs nothing but python3 and make.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)

.DEFAULT_GOAL := help
.PHONY: help overfit overfit-checkpoint overfit-seeds overfit-study overfitting digits stability scale-study optimizer break faults scale bench report test test-slow lint tensorboard tensorboard-shots

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# The stamp's name carries requirements.txt's checksum, so editing it reinstalls; a checkout that only
# touches its mtime does not.
$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

overfit: $(STAMP) ## the main job: overfit the 200-sample moons set, save checkpoints/overfit/
	$(PY) train.py --run-name overfit --overwrite --print-every 10

overfit-checkpoint: overfit ## refresh the committed checkpoint, checkpoints/overfit.pt, from make overfit's last.pt
	cp checkpoints/overfit/last.pt checkpoints/overfit.pt

overfit-seeds: $(STAMP) ## seeds 0-9 with the default recipe: epochs/steps to 100% acc and loss <= 1e-3
	$(PY) -m launch.overfit_seeds --out reports/overfit

overfit-study: $(STAMP) ## one-at-a-time study of lr, width, depth, batch, optimizer, data (table + PNGs)
	$(PY) -m launch.overfit_study --out reports/overfit

overfitting: $(STAMP) ## a real overfitting run: val loss turns up; best.pt vs last.pt on fresh data (reports/overfitting)
	$(PY) -m launch.overfitting --out reports/overfitting

stability: $(STAMP) ## the stability edge: lambda_max at init against lr sweeps of SGD, momentum, Adam (reports/stability)
	$(PY) -m launch.stability --out reports/stability

scale-study: $(STAMP) ## Part 4 on 5 seeds: data size at fixed epochs and steps, batch, warmup (reports/scale-study)
	$(PY) -m launch.scale_study --out reports/scale-study

digits: $(STAMP) ## CNN on scikit-learn's 8x8 digits, 5 seeds x fp32/bf16/fp16, >= 97% val; overfit 200 images (reports/digits)
	$(PY) -m launch.digits --out reports/digits

break: $(STAMP) ## every deliberate bug vs a baseline: table, overlay PNGs, detected symptoms (reports/break)
	$(PY) -m launch.break_all --out reports/break

faults: $(STAMP) ## inject every fault for real (kill, hang, torn write, NaN, ...): reports/reliability/faults.md
	$(PY) -m launch.faults --out reports/reliability

SCALE ?= default
scale: $(STAMP) ## data size, batch (lr fixed/scaled), world size, accumulation x 3 seeds: CSV, table, PNGs (reports/scale); SCALE=large
	$(PY) -m launch.scale --out reports/scale --size $(SCALE)

optimizer: $(STAMP) ## the papers' checks: edge of stability, noise scale vs critical batch, update ratios, LR test (reports/optimizer)
	$(PY) -m launch.inside_optimizer --out reports/optimizer

report: $(STAMP) ## rerun what the write-ups cite but is missing (FORCE=1: all of it), refill their tables
	$(PY) -m launch.report $(if $(FORCE),--force)

bench: $(STAMP) ## train.py's loop vs a bare loop doing the same work, block by block in one process (reports/bench/bench.md)
	$(PY) -m launch.bench --out reports/bench

# Three workers on two cores: the Slurm tests and the hang tests spend most of their time waiting (on the
# scheduler, on a process-group timeout), and a third worker keeps both cores busy meanwhile.
test: $(STAMP) ## ruff, then the test suite (CPU, gloo, real processes)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 3 --dist loadgroup

test-slow: $(STAMP) ## the torch.compile tests left out of make test (minutes of cold CPU compiles)
	$(PY) -m pytest -q -m slow

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .

tensorboard: $(STAMP) ## serve runs/ on http://127.0.0.1:6006
	$(VENV)/bin/tensorboard --logdir runs --host 127.0.0.1 --port 6006

tensorboard-shots: $(STAMP) ## two small runs in TensorBoard, shot by headless Chromium: reports/tensorboard/*.png
	$(PY) -m launch.tensorboard_shots --out reports/tensorboard
