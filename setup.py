"""Builds the optional C++ CPU kernel (vllm_aser._w4a8_cpu) when torch is importable at build time.

Everything else is in pyproject.toml. Without torch in the build environment (an isolated build), or on a
non-x86 machine, the package installs without the extension and the plugin falls back to the oneDNN path,
saying why in its log.
"""

import os
import platform

from setuptools import setup


def _extensions():
    if platform.machine().lower() not in ("x86_64", "amd64") or os.environ.get("VLLM_ASER_NO_EXTENSION") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    ext = CppExtension(
        "vllm_aser._w4a8_cpu",
        ["vllm_aser/csrc/w4a8_cpu.cpp"],
        depends=["vllm_aser/csrc/w4a8_cpu_isa.inc"],
        # baseline x86-64 code: the ISA paths are compiled per function (#pragma GCC target) and chosen at run time
        extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
