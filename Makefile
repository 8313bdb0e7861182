# Two commands do all set-up on a fresh machine:  make demo  and  make test.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install demo test lint bench clean

# torch first, pinned, and only when absent: a bare `torch` requirement would pull a multi-GB CUDA build. On a
# Linux machine without a GPU whose pip offers only PyPI (whose Linux torch wheel depends on CUDA packages), give
# PyTorch's CPU index:  make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || \
		$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[dev]'
	$(PYTHON) -m nanoseek.data --install-default

# the most complete pipeline so far: pretrain 10 minutes on the built-in corpus, then generate from it. Run again,
# it continues the run (an interrupted one goes on where it stopped; a finished one is only evaluated again).
demo: install
	$(PYTHON) -m nanoseek pretrain --run runs/demo --time-budget 600 \
		$$(test -e runs/demo/base/checkpoint.safetensors && echo --resume)
	$(PYTHON) -m nanoseek generate runs/demo "In the beginning" --max-new-tokens 60 --seed 0
	@echo "next: nanoseek chat runs/demo   or   nanoseek serve runs/demo  (then open http://127.0.0.1:8000)"

test: install
	$(PYTHON) -m pytest tests

lint:
	ruff check .

bench:
	$(PYTHON) bench/model.py

clean:
	rm -rf runs .pytest_cache build *.egg-info
