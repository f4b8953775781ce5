"""Builds the CMM kernel (csrc/) as a torch C++ extension, against the torch already installed.

csrc/ops.cpp registers the ops, csrc/cpu/ holds the CPU kernels (CMM, the dense linear, packed attention),
csrc/python/ the CPython fast path; the sources in csrc/cuda/ are compiled only where torch has CUDA and nvcc is
present.
"""

import os
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# -march=native would tie the binary to the build machine; instead the kernel is compiled with
# function-level target attributes (AVX-512, AVX2/FMA) and picks its path at run time (csrc/cpu/cmm_cpu.cpp).
cxx = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"]
if os.environ.get("UFB_KERNEL_DEBUG"):
    cxx = ["-O0", "-g", "-fopenmp", "-std=c++17"]

sources = [
    "csrc/ops.cpp",
    "csrc/cpu/cmm_op.cpp",
    "csrc/cpu/cmm_cpu.cpp",
    "csrc/cpu/linear_op.cpp",
    "csrc/cpu/linear_cpu.cpp",
    "csrc/cpu/attention_op.cpp",
    "csrc/cpu/attention_cpu.cpp",
    "csrc/python/fast_path.cpp",
]
cuda_sources = sorted(str(p) for p in Path("csrc/cuda").glob("*.cu"))
# CUDA sources need a CUDA build of torch and the CUDA toolkit; UFB_NO_CUDA=1 builds the CPU extension regardless.
has_cuda = torch.version.cuda is not None and CUDA_HOME is not None
with_cuda = bool(cuda_sources) and has_cuda and not os.environ.get("UFB_NO_CUDA")

common = {"include_dirs": [str(Path("csrc").resolve())], "extra_link_args": ["-fopenmp"]}
if with_cuda:
    extension = CUDAExtension(
        name="engine._cmm",
        sources=sources + cuda_sources,
        define_macros=[("UFB_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
        **common,
    )
else:
    extension = CppExtension(name="engine._cmm", sources=sources, extra_compile_args=cxx, **common)


class BuildInPlaceSafely(BuildExtension.with_options(use_ninja=True)):
    """An editable install copies the built library over engine/_cmm*.so; writing into that file would crash a
    server or training run that has it mapped (SIGBUS), so the old file is unlinked first and they keep its inode."""

    def copy_extensions_to_source(self) -> None:
        if self.inplace:
            for ext in self.extensions:
                Path(self.get_ext_filename(ext.name)).unlink(missing_ok=True)
        super().copy_extensions_to_source()


setup(ext_modules=[extension], cmdclass={"build_ext": BuildInPlaceSafely})
