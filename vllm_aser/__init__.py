"""vLLM plugin for ASER W4A8 models.

`register()` is vLLM's general-plugin entry point; it runs in every vLLM process, so it only imports the
module that registers the `aser` quantization method (idempotent: a module is imported once per process).
Nothing here imports vLLM at package import time: the offline quantizer imports `vllm_aser.format`.
"""

__version__ = "0.1.0"


def register() -> None:
    import vllm_aser.config  # noqa: F401  (registers "aser" with vLLM on import)
