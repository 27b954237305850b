"""Builds ep_ops._C with torch's cpp_extension and ninja.

CPU-only where torch has no CUDA or no CUDA toolkit is found; CPU+CUDA otherwise (the CUDA
sources live in csrc/cuda/). Set EP_OPS_FORCE_CPU=1 to build the CPU-only library anyway.
"""

import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def build_cuda() -> bool:
    import torch

    if os.environ.get("EP_OPS_FORCE_CPU") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    # csrc/collective/ builds as one unit (see unity_build.cpp); its files are not listed one by one.
    cpp_sources = sources("csrc/*.cpp") + ["csrc/collective/unity_build.cpp"]
    # No -std flag: cpp_extension picks the standard the installed torch's headers need.
    cxx_flags = ["-O3"]
    if build_cuda():
        cuda_sources = sources("csrc/cuda/**/*.cu") + sources("csrc/cuda/**/*.cpp")
        arch = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        print(f"ep_ops: building CPU+CUDA extension (arch list {arch}), {len(cuda_sources)} CUDA sources")
        return cpp_extension.CUDAExtension(
            "ep_ops._C",
            cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DEP_OPS_WITH_CUDA"], "nvcc": ["-O3"]},
        )
    print("ep_ops: building CPU-only extension (no CUDA torch or no CUDA toolkit)")
    return cpp_extension.CppExtension("ep_ops._C", cpp_sources, extra_compile_args={"cxx": cxx_flags})


setup(
    name="ep_ops",
    version="0.1.0",
    description="Expert-parallel dispatch/combine as torch.library ops, compile- and graph-friendly",
    packages=["ep_ops", "ep_ops.meta"],
    package_dir={"ep_ops": "ep_ops", "ep_ops.meta": "meta"},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.11",
    install_requires=["torch>=2.11"],
)
