# The README's commands. `make demo` and `make test` install what they need first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
KERAS_HOME ?= $(HOME)/.keras
STAMP := $(VENV)/.installed

.PHONY: setup weights browser demo test test-fast lint bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[pipeline,serve,dev]'
	@touch $(STAMP)

setup: $(STAMP) weights browser  ## create .venv and install the project with its extras

# Debian's Chromium for the demo-page test (Playwright drives it; it never downloads a browser).
browser:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian chromium for the browser test"; \
	  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "chromium not installed: the demo-page test will be skipped (apt-get install chromium)"; fi

# Offline ImageNet weights: copy them into the Keras cache when ../shared has them.
weights:
	@if [ -d "$(SHARED)/weights/keras/models" ]; then \
	  mkdir -p "$(KERAS_HOME)/models" && cp -u $(SHARED)/weights/keras/models/*.h5 "$(KERAS_HOME)/models/" && \
	  echo "ImageNet weights copied to $(KERAS_HOME)/models"; \
	else echo "no $(SHARED)/weights: real-data backbones will need their weights in $(KERAS_HOME)/models"; fi

# The ImageNet weights the component image carries (images/weights/, which its Dockerfile copies into
# the image's Keras cache): from ../shared, else from this machine's Keras cache. Never downloads.
IMAGE_WEIGHTS ?= images/weights
.PHONY: image-weights
image-weights:  ## copy the ImageNet weight files into images/weights before `docker build`
	@src=""; for dir in "$(SHARED)/weights/keras/models" "$(KERAS_HOME)/models"; do \
	  if ls "$$dir"/*.h5 >/dev/null 2>&1; then src="$$dir"; break; fi; done; \
	if [ -z "$$src" ]; then \
	  echo "error: no ImageNet weight files (*.h5) in $(SHARED)/weights/keras/models or $(KERAS_HOME)/models;" \
	    "put them in $(IMAGE_WEIGHTS) by hand (e.g. mobilenet_7_5_224_tf_no_top.h5)" >&2; exit 1; fi; \
	mkdir -p "$(IMAGE_WEIGHTS)" && cp -u "$$src"/*.h5 "$(IMAGE_WEIGHTS)/" && \
	echo "copied to $(IMAGE_WEIGHTS) from $$src:" $$(cd "$$src" && ls *.h5)

demo: setup  ## the main job on the offline default: the whole pipeline (train, evaluate, gate, register)
	$(BIN)/captioner pipeline run --local --config synthetic --pipeline-root runs/pipeline --model-repo models \
	  --serving-base-path /models
	$(BIN)/captioner runs show latest --pipeline-root runs/pipeline
	$(BIN)/captioner caption --model models --beam-size 3 $$($(BIN)/captioner data samples --config synthetic -n 3)
	@echo "the synthetic test images are in $$($(BIN)/captioner data samples --config synthetic --folder)"
	@echo "serve it: $(BIN)/captioner serve --model-repo models   (then open http://127.0.0.1:8080/demo)"

test: setup  ## the whole suite (CI runs this)
	$(BIN)/pytest -q --durations=25

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

# Needs a trained Flickr8k model: SAVED_MODEL=runs/f8k/saved_model make bench
SAVED_MODEL ?= runs/f8k/saved_model
bench: setup
	$(BIN)/python benchmarks/bench_speed.py --config flickr8k --set data.root=$(SHARED)/data/flickr8k \
	  --saved-model $(SAVED_MODEL)
	$(BIN)/python benchmarks/bench_gateway.py --saved-model $(SAVED_MODEL) \
	  --image $(SHARED)/data/flickr8k/images/3385593926_d3e9c21170.jpg

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
