"""Builds the CMM kernel (csrc/) as a torch C++ extension, against the torch already installed."""
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# -march=native would tie the binary to the build machine; instead the kernel is compiled with
# function-level target attributes (AVX-512, AVX2/FMA) and picks its path at run time (csrc/cmm_cpu.cpp).
extra = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"]
if os.environ.get("UFB_KERNEL_DEBUG"):
    extra = ["-O0", "-g", "-fopenmp", "-std=c++17"]

setup(
    ext_modules=[
        CppExtension(
            name="engine._cmm",
            sources=["csrc/cmm_cpu.cpp", "csrc/register.cpp"],
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
