# Shortcuts for the scripts (each sets up .venv itself).
.PHONY: quickstart test eval bench

quickstart:  ## quantize SmolLM2-135M with ASER, serve it with vLLM, query it
	bash examples/quickstart.sh

test:  ## the whole test suite (what CI runs)
	bash scripts/test.sh

eval:  ## the accuracy table in docs/accuracy/ (resumable; ARGS="--only REGEX" for some rows)
	bash scripts/eval.sh $(ARGS)

bench:  ## throughput vs BF16 / W8A8 / W4A16 and the serving load test, in docs/throughput/ (ARGS for throughput.py)
	bash scripts/bench.sh $(ARGS)
