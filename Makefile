# The two commands of the README. Both create .venv on first use.
.PHONY: demo test test-all venv

venv:
	@bash scripts/setup_env.sh

# Main job on the embedded toy default: sample the shipped teacher at several step counts and
# score every step count with ToyBench.
demo: venv
	HF_HUB_OFFLINE=1 .venv/bin/anystep generate --model models/toy-teacher --prompts configs/toy/demo_prompts.txt --steps 50 --out outputs/demo/clips-50steps
	HF_HUB_OFFLINE=1 .venv/bin/anystep eval --model models/toy-teacher --steps 4,8,16,50 --out outputs/demo

test: venv
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q

test-all: venv
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -m ""
