# make quickstart: install into .venv (idempotent) and run the CPU quickstart (configs/quickstart.yaml)
# make test:       install into .venv and run the whole test suite (what .ci/run runs)
# make base:       rebuild models/base, the shipped pretrained base model (about 30 min on 2 cores)
# CHORUS_DEVICE=cpu|cuda overrides GPU detection; ARGS="key=value ..." passes config overrides to the quickstart.
.PHONY: install quickstart smoke test unit base

install:
	ops/install.sh

quickstart: install
	.venv/bin/chorus train configs/quickstart.yaml $(ARGS)

smoke: install
	.venv/bin/chorus train configs/smoke.yaml $(ARGS)

test: install
	.venv/bin/python -m pytest -q

unit: install
	.venv/bin/python -m pytest -q tests/unit

base: install
	ops/build_base.sh
