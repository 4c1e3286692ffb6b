# controlnet-cog: one Cog image per ControlNet condition. `make help` lists the targets.
COND ?= canny
PORT ?= 5000
# Targets that start their own Cog server take PORT only when it is given (else a free port, so that they
# never collide with a `make serve` on 5000).
comma := ,
SERVER_PORT = $(if $(filter command line environment,$(origin PORT)),--port $(PORT))
KEEP ?=
PLAYGROUND_PORT ?= 7860
IMAGE ?=
PROMPT ?= a cozy cottage with a red roof, photorealistic, golden hour
ARGS ?=
# make serve COND=custom: WEIGHTS (COG_WEIGHTS for the server, a trained tar's URL or path), MODE=train for /trainings
WEIGHTS ?=
MODE ?= predict
PAIRS ?=
PY := .venv/bin/python
TEMPLATE ?=

# An unknown COND is one line naming the conditions, before any target runs (COND=a,b for make fuzz).
ifneq ($(filter command line environment,$(origin COND)),)
KNOWN_CONDS := $(shell python3 -c 'import json; m = json.load(open("weights/manifest.json")); print(*m["conditions"], *m.get("combined", {}), *m.get("families", {}))')
UNKNOWN_CONDS := $(filter-out $(KNOWN_CONDS),$(subst $(comma), ,$(COND)))
ifneq ($(strip $(UNKNOWN_CONDS)),)
$(error unknown COND=$(COND); the conditions are: $(KNOWN_CONDS))
endif
endif

.PHONY: help quickstart test test-all install tiny-weights weights serve predict train image image-test deploy clean playground sample-image soak fuzz stop-trials bench bench-smoke

help:
	@printf '%-38s %s\n' \
		"make quickstart [COND=canny]" "install, start the Cog server, one prediction on a drawing into outputs/, stop" \
		"make test" "the in-process tests: the developer's loop (offline, CPU, tiny weights; no Cog server)" \
		"make test-all" "every test: also real Cog servers, fuzzing, the soak and the browser (CI)" \
		"make weights COND=canny" "download the real weights (needs internet)" \
		"make tiny-weights" "write tiny random-weight models (offline, for tests)" \
		"make playground [COND=canny]" "the Cog server + a page to try it: http://127.0.0.1:PLAYGROUND_PORT (7860)" \
		"make serve [COND=canny] [PORT=5000]" "Cog's HTTP server on 127.0.0.1:PORT; prints READY on http://... when ready" \
		"make predict IMAGE=x.png PROMPT=..." "one prediction to the server on PORT, progress live (ARGS='-i seed=42 -i num_samples=4')" \
		"make sample-image" "the quickstart's drawing -> outputs/sample-input.png (for the curl example)" \
		"make fuzz [COND=canny] [EXAMPLES=500]" "schema-driven fuzzing of COND's server only (COND=a,b for several); prints the requests sent" \
		"make stop-trials [TRIALS=10]" "stop servers by signal (group/server, idle/busy/starting) TRIALS times each" \
		"make soak [N=1000] [COND=canny]" "N sequential predictions: failures, worker memory, temp files left" \
		"make train PAIRS=pairs.zip" "train the custom ControlNet (ARGS='-i max_train_steps=500'); weights -> outputs/" \
		"make serve COND=custom WEIGHTS=x.tar" "serve a trained ControlNet (MODE=train: serve /trainings instead)" \
		"make image COND=canny" "build the controlnet-canny image (cog build, or docker build without cog)" \
		"make image-test COND=canny [KEEP=1]" "build a tiny-weights image, run it, predict, stop, clean up (KEEP=1 keeps the image)" \
		"make deploy COND=canny REF=img:tag" "Knative / KServe / Kubernetes manifests for your pushed image -> build/deploy/canny/ (TEMPLATE=1: no image yet)" \
		"make bench [BENCH_ARGS=...]" "benchmark, full-size random-weight models (GPU; docs/benchmarks.md)" \
		"make bench-smoke" "the same harness, tiny models on CPU (CI)" \
		"make bench-weights" "write the full-size random-weight models the benchmark loads" \
		"make test-compile" "the fast path's torch.compile test (slow on CPU; skipped by make test)" \
		"make gpu-bundle" "the wheels the lent GPU machine lacks -> .gpu-bundle/ (carried there; docs/benchmarks.md)" \
		"make gpu-rehearsal" "bench/device.sh end to end on CPU, tiny, on the GPU machine's package versions (CI)" \
		"make install" "the pinned virtualenv (cached in ~/.cache/controlnet-cog; .venv links to it)" \
		"make clean" "remove build/, outputs/ and .pytest_cache (not the venv, not the weights)" \
		"make help" "this list"
	@printf '\nVariables:\n'
	@printf '  %-16s %s\n' \
		"COND" "the condition (default canny)" \
		"PORT" "the Cog server's port: 5000 for serve and predict; the other targets that start a server use it when given" \
		"PLAYGROUND_PORT" "the playground page's port (7860)" \
		"KEEP" "KEEP=1: make image-test keeps the image it built and prints how to run it"

quickstart: tiny-weights
	$(PY) -m scripts.quickstart --cond $(COND) $(SERVER_PORT)

# The tiers are marked in tests/conftest.py ("slow": a real Cog server, fuzzing, the soak, a browser).
test: tiny-weights
	$(PY) -m pytest -m "not slow"

test-all: tiny-weights
	$(PY) -m pytest

install:
	@scripts/venv.sh

tiny-weights: install
	$(PY) -m weights.tiny

weights: install
	$(PY) -m weights.download $(COND)

serve: tiny-weights
	$(PY) -m scripts.serve $(COND) --port $(PORT) --mode $(MODE) --weights "$(WEIGHTS)"

playground: tiny-weights
	$(PY) -m scripts.playground --cond $(COND) --port $(PLAYGROUND_PORT) $(if $(SERVER_PORT),--cog-port $(PORT))

sample-image: install
	$(PY) -m scripts.quickstart --sample-only

predict: install
	$(PY) -m scripts.predict --port $(PORT) --name $(COND) --image "$(IMAGE)" --prompt "$(PROMPT)" $(ARGS)

train: tiny-weights
	$(PY) -m scripts.train --pairs "$(PAIRS)" $(SERVER_PORT) $(ARGS)

# Stdlib only: building an image needs no virtualenv here.
image:
	python3 -m scripts.build_image $(COND)

# A real container from the staged context with tiny weights; needs root (installs docker.io, debootstrap).
image-test: tiny-weights
	$(PY) -m scripts.image_test $(COND) $(SERVER_PORT) $(if $(KEEP),--keep)

deploy: install
	@$(PY) -m scripts.deploy_manifests $(COND) $(if $(REF),--image $(REF)) $(if $(TEMPLATE),--template) $(ARGS)

N ?= 1000
soak: tiny-weights
	$(PY) -m scripts.soak -n $(N) --cond $(COND) $(SERVER_PORT)

EXAMPLES ?= 500
fuzz: tiny-weights
	FUZZ_EXAMPLES=$(EXAMPLES) FUZZ_CONDITIONS=$(COND) $(if $(SERVER_PORT),FUZZ_PORT=$(PORT)) $(PY) -m pytest tests/test_fuzz.py -p no:cacheprovider

TRIALS ?= 10
stop-trials: tiny-weights
	STOP_TRIALS=$(TRIALS) $(PY) -m pytest tests/test_serving.py -k stop_signal -p no:cacheprovider

clean:
	rm -rf build outputs .pytest_cache

# Benchmarks (docs/benchmarks.md). BENCH_ARGS adds to or overrides the harness's options.
BENCH_ARGS ?=
.PHONY: bench bench-smoke bench-weights test-compile

bench-weights: install
	$(PY) -m bench.weights

bench: install
	$(PY) -m bench.run --size full $(BENCH_ARGS)

# CI: the same harness on the tiny weights on CPU, bounded; fails when a figure is missing.
bench-smoke: tiny-weights
	$(PY) -m bench.run --size tiny --device cpu --resolution 256 --steps 2 1 --runs 1 --warmup 0 \
		--fast vae_guard,channels_last --lossy 1 --out build/bench/smoke $(BENCH_ARGS)

test-compile: tiny-weights
	CONTROLNET_TEST_COMPILE=1 $(PY) -m pytest tests/test_fast.py -q

# The lent GPU machine (docs/benchmarks.md, "Still to run on a GPU"): it reaches no registry, so what it
# lacks travels as wheels (bench/gpu-bundle.lock); bench/device.sh is the one command run there.
# Stdlib and pip only: no virtualenv needed. The machine-wide pip config's torch cap does not apply.
.PHONY: gpu-bundle gpu-rehearsal
gpu-bundle:
	PIP_CONFIG_FILE=/dev/null python3 -m bench.bundle

gpu-rehearsal: gpu-bundle
	bench/rehearsal.sh
