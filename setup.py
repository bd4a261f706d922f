"""Builds robe_dist's C++ operators (robe_dist._C) against the installed torch.

Everything else about the package is in pyproject.toml. Install with
``pip install --no-build-isolation -e .`` (launch/setup.sh does) so the
extension is compiled against the torch already in the environment.
Set ROBE_DIST_NO_EXT=1 to skip the build: robe_dist then falls back to its
pure-PyTorch lookup (same results, much slower on CPU).
"""

import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("ROBE_DIST_NO_EXT", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]
    # The operator is compiled on the machine that runs it (from source), so
    # tuning for the host CPU is safe; ROBE_DIST_MARCH= (empty) turns it off.
    march = os.environ.get("ROBE_DIST_MARCH", "native")
    if march:
        cxx_flags.append(f"-march={march}")
    ext_modules.append(
        CppExtension(
            name="robe_dist._C",
            sources=["robe_dist/csrc/robe_cpu.cpp", "robe_dist/csrc/hugepage.cpp", "robe_dist/csrc/bus_error.cpp"],
            depends=["robe_dist/csrc/hugepage.h", "robe_dist/csrc/bus_error.h"],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=False)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
