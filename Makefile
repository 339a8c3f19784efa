# The two commands of the README. Both create .venv on first use.
.PHONY: demo test test-all venv

venv:
	@bash scripts/setup_env.sh

# Main job on the embedded toy default: the paper in miniature, quick mode. From the shipped toy
# teacher it trains every Table 2 method (bidirectional and causal), sweeps NFE 1..32 with
# ToyBench and writes outputs/reproduce-quick/{report.md,scaling.png,samples.png,cost.md}.
# Re-running reuses finished work.
demo: venv
	HF_HUB_OFFLINE=1 .venv/bin/anystep reproduce --quick --out outputs/reproduce-quick
	@sed -n '/^## Table 2/,/^Ceiling/p' outputs/reproduce-quick/report.md

test: venv
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q

test-all: venv
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -m ""
