# make test   - from a fresh clone: venv, pinned dependencies, the extension (CUDA kernels included
#               where nvcc is found), the CMake library + CTest, a CPU-only build smoke test, pytest
# make bench  - every benchmark (tables printed, JSON in bench/results/)
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
JOBS   ?= $(shell nproc)
CPU_ONLY := build/cpu-only

.PHONY: test venv build cmake-test cpu-only-test pytest bench clean

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements.txt | $(VPY)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	touch $@

venv: $(DEPS)

# No build isolation: it would fetch a second multi-GB torch into a temporary environment.
build: venv
	MAX_JOBS=$(JOBS) $(VPY) -m pip install -q --no-build-isolation --no-deps -e .

cmake-test: venv
	mkdir -p build
	cmake -S . -B build/cmake $$($(VPY) tests/cpp/torch_cmake_args.py) > build/cmake-configure.log 2>&1 || (cat build/cmake-configure.log; exit 1)
	cmake --build build/cmake -j $(JOBS)
	ctest --test-dir build/cmake --output-on-failure

# A CPU-only build (MAPOPT_CUDA=0) next to the main one: build, import, smoke test.
cpu-only-test: venv
	rm -rf $(CPU_ONLY)
	MAPOPT_CUDA=0 MAX_JOBS=$(JOBS) $(VPY) setup.py -q build_ext --build-temp $(CPU_ONLY)/tmp --build-lib $(CPU_ONLY)/lib
	mkdir -p $(CPU_ONLY)/pkg
	cp -r mapopt_native $(CPU_ONLY)/pkg/
	rm -f $(CPU_ONLY)/pkg/mapopt_native/_C*.so
	cp $(CPU_ONLY)/lib/mapopt_native/_C*.so $(CPU_ONLY)/pkg/mapopt_native/
	PYTHONPATH=$(CPU_ONLY)/pkg $(VPY) tests/cpu_only_smoke.py $(CPU_ONLY)/pkg

pytest: build
	$(VPY) -m pytest -q tests

test: build cmake-test cpu-only-test pytest

bench: build
	$(VPY) -m mapopt_native bench

clean:
	rm -rf build mapopt_native/_C*.so *.egg-info
