# make quickstart: install into .venv (idempotent) and run the CPU quickstart (configs/quickstart.yaml)
# make test:       install into .venv and run the whole test suite (what .ci/run runs)
# CHORUS_DEVICE=cpu|cuda overrides GPU detection; ARGS="key=value ..." passes config overrides to the quickstart.
.PHONY: install quickstart smoke test unit

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
