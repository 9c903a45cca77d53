# Two commands do all the set-up on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run chat test bench install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24,<26"
	# torch first, from the local CPU wheel, so nothing pulls a CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test,ct2]"
	# the float16 decode-attention kernel, compiled now rather than at the bot's first start
	# (prints "not available" and the bot attends with torch where it cannot be built)
	$(PY) -m bot.decode_kernel
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/dialogbot run $(ARGS)

chat: $(STAMP)
	$(VENV)/bin/dialogbot chat $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

# throughput, latency and memory of every generator option on the DialoGPT-medium shape (the
# bot's default model), then on the small shape; three A/Bs (heap release, activation in place,
# attention on stored float16 keys/values against widening them);
# what reply quality costs; how long fetching a group message's context takes in a busy
# channel; training speed; what a second character costs
bench: $(STAMP)
	$(PY) bench/bench.py --size medium --json bench/results/medium.json $(ARGS)
	$(PY) bench/bench.py --size small --json bench/results/small.json $(ARGS)
	$(PY) bench/bench_ab.py --size medium
	$(PY) bench/bench_quality.py --lm-shape small --ranker-shape medium --new-tokens 40 $(QUALITY_ARGS)
	$(PY) bench/bench_context.py --json bench/results/context.json
	$(PY) bench/bench_train.py $(TRAIN_ARGS)
	$(PY) bench/bench_characters.py $(CHARACTERS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
