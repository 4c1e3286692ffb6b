# controlnet-cog: one Cog image per ControlNet condition. `make help` lists the targets.
COND ?= canny
PORT ?= 5000
IMAGE ?=
PROMPT ?= a cozy cottage with a red roof, photorealistic, golden hour
ARGS ?=
PY := .venv/bin/python

.PHONY: help quickstart test install tiny-weights weights serve predict image image-test deploy clean soak fuzz

help:
	@echo "make quickstart [COND=canny]        install, start the Cog server, one prediction into outputs/, stop"
	@echo "make test                           the test suite (offline, CPU, tiny weights)"
	@echo "make weights COND=canny             download the real weights (needs internet)"
	@echo "make tiny-weights                   write tiny random-weight models (offline, for tests)"
	@echo "make serve COND=canny PORT=5000     Cog's HTTP server on 127.0.0.1:PORT"
	@echo "make predict IMAGE=x.png PROMPT=..  send one prediction to the running server (ARGS='-i seed=42 -i num_samples=4')"
	@echo "make image COND=canny               build the controlnet-canny image (cog build, or docker build without cog)"
	@echo "make image-test COND=canny          build a tiny-weights image, run it, predict, stop, clean up (~2-8 min)"
	@echo "make deploy COND=canny REF=img:tag Knative / Kubernetes manifests into build/deploy/canny/"
	@echo "make soak [N=1000] [COND=canny]     N sequential predictions: failures, worker memory, temp files left"
	@echo "make fuzz [COND=canny] [EXAMPLES=500]  schema-driven fuzzing of a real server (the suite runs a short one)"

quickstart: tiny-weights
	$(PY) -m scripts.quickstart --cond $(COND)

test: tiny-weights
	$(PY) -m pytest

install:
	@scripts/venv.sh

tiny-weights: install
	$(PY) -m weights.tiny

weights: install
	$(PY) -m weights.download $(COND)

serve: tiny-weights
	$(PY) -m scripts.serve $(COND) --port $(PORT)

predict: install
	$(PY) -m scripts.predict --port $(PORT) --name $(COND) --image "$(IMAGE)" --prompt "$(PROMPT)" $(ARGS)

# Stdlib only: building an image needs no virtualenv here.
image:
	python3 -m scripts.build_image $(COND)

# A real container from the staged context with tiny weights; needs root (installs docker.io, debootstrap).
image-test: tiny-weights
	$(PY) -m scripts.image_test $(COND)

deploy: install
	$(PY) -m scripts.deploy_manifests $(COND) $(if $(REF),--image $(REF))

N ?= 1000
soak: tiny-weights
	$(PY) -m scripts.soak -n $(N) --cond $(COND)

EXAMPLES ?= 500
fuzz: tiny-weights
	FUZZ_EXAMPLES=$(EXAMPLES) FUZZ_CONDITIONS=$(COND) $(PY) -m pytest tests/test_fuzz.py -p no:cacheprovider

clean:
	rm -rf build outputs .pytest_cache
