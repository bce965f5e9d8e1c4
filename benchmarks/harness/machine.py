"""One line naming the machine a benchmark ran on: CPU model, cores, memory, and the CPU features that pick
vLLM's CPU kernels (AMX int8/bf16 or AVX-512 only), since figures from different CPUs must not be compared."""

from __future__ import annotations

import os
import platform


def describe_machine() -> str:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if "amx_int8" in flags:
        isa = "AMX-INT8/BF16"
    elif "avx512_vnni" in flags:
        isa = "AVX-512 VNNI" + ("/BF16" if "avx512_bf16" in flags else "") + ", no AMX"
    else:
        isa = "no AVX-512 VNNI, no AMX"
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({model or 'unknown model'}, {isa}), {memory:.0f} GiB, no GPU"


def machine_tag(description: str) -> str:
    """A short name for the CPU kind of a describe_machine() line (results of different CPUs are kept apart
    under it): vendor and the ISA that picks the kernels, e.g. 'Intel AMX', 'AMD AVX2'."""
    vendor = "Intel" if "Intel" in description else "AMD" if "AMD" in description else "CPU"
    if "AMX" in description and "no AMX" not in description:
        return f"{vendor} AMX"
    if "AVX-512 VNNI" in description and "no AVX-512 VNNI" not in description:
        return f"{vendor} AVX-512"
    return f"{vendor} AVX2"
