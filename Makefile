# The two commands of the README. Each bootstraps .venv (torch==2.13.0 first, then the project).
.PHONY: demo test bench bench-full proto clean

demo:
	./scripts/bootstrap.sh
	.venv/bin/kvstore demo

test:
	./scripts/bootstrap.sh "[test]"
	.venv/bin/lint-imports
	.venv/bin/python -m pytest

bench:
	./scripts/bootstrap.sh "[test,bench]"
	.venv/bin/python bench/all.py

bench-full:
	./scripts/bootstrap.sh "[test,bench]"
	.venv/bin/python bench/all.py --full

proto:
	./scripts/bootstrap.sh "[test]"
	./scripts/gen_proto.sh

clean:
	rm -rf .venv .pytest_cache .hypothesis
