# Everything a fresh machine needs, from these targets alone.
#   make test                       create the environment, install, run every test
#   make predict ARGS='-i prompt="lofi beat" -i duration=4 -o out.wav'
#   make predict WEIGHTS=tiny ARGS=...   the same on tiny random models (no download; the audio is noise)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WEIGHTS ?= weights
MODELS ?= small

.PHONY: test predict install system-deps tiny-weights weights schema clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed system-deps

system-deps:
	@command -v ffmpeg >/dev/null || { \
	  echo "installing ffmpeg (decodes input audio)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq ffmpeg >/dev/null; }

test: install
	$(PY) -m pytest -q tests

tiny-weights: $(VENV)/.installed
	$(PY) script/make-tiny-weights .tiny-weights

weights: $(VENV)/.installed
	@ls -d weights/*/ >/dev/null 2>&1 || $(PY) script/download-weights $(MODELS)

ifeq ($(WEIGHTS),tiny)
predict: install tiny-weights
	$(PY) script/predict --weights .tiny-weights $(ARGS)
else
predict: install weights
	$(PY) script/predict --weights $(WEIGHTS) $(ARGS)
endif

schema: $(VENV)/.installed
	$(PY) -m lib.openapi

clean:
	rm -rf .cog .tiny-weights .pytest_cache
