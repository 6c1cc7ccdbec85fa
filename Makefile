# The two commands of the README. Each bootstraps .venv (torch==2.13.0 first, then the project).
.PHONY: demo test bench proto clean

demo:
	./scripts/bootstrap.sh
	.venv/bin/kvstore demo

test:
	./scripts/bootstrap.sh "[test]"
	.venv/bin/lint-imports
	.venv/bin/python -m pytest

bench:
	./scripts/bootstrap.sh "[test,bench]"
	.venv/bin/python bench/tiers.py --quick
	.venv/bin/python bench/remote.py --quick
	.venv/bin/python bench/ttft.py --quick
	.venv/bin/python bench/mixed.py --quick
	.venv/bin/python bench/decode.py --quick
	.venv/bin/python bench/codec_quality.py --quick
	.venv/bin/python bench/policies.py --quick
	.venv/bin/python bench/trace.py
	.venv/bin/python bench/http_demo.py --quick
	.venv/bin/python bench/agents.py --quick

proto:
	./scripts/bootstrap.sh "[test]"
	./scripts/gen_proto.sh

clean:
	rm -rf .venv .pytest_cache .hypothesis
