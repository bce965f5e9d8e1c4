# Source this: the environment the vLLM CPU build wants on this kind of machine.
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export VLLM_ASER_VENV=${VLLM_ASER_VENV:-$_root/.venv}
export PATH="$VLLM_ASER_VENV/bin:$PATH"
# Without Intel OpenMP preloaded every op carries ~8 ms of OpenMP overhead on the CPU build.
export LD_PRELOAD="$VLLM_ASER_VENV/lib/libiomp5.so${LD_PRELOAD:+:$LD_PRELOAD}"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export TOKENIZERS_PARALLELISM=false
# vLLM's automatic binding keeps one core per worker for its scheduler: on 2 cores the model got one OpenMP thread.
# Binding the one worker to every CPU this shell may use measured 1.40x decode and 1.68x batched throughput
# (docs/throughput/vs_llamacpp.md). Tensor parallel needs one list per rank: set e.g. VLLM_CPU_OMP_THREADS_BIND="0|1".
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-$(python3 -c 'import os; print(",".join(map(str, sorted(os.sched_getaffinity(0)))))')}
unset _root
