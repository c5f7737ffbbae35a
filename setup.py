"""Build loca_kernels: CMake + ninja compile csrc/ into the extension loca_kernels._C.

Environment:
  LOCA_KERNELS_CUDA=auto|0|1   build the CUDA kernels (auto: when torch has CUDA and nvcc exists;
                               1: fail if that is impossible; 0: CPU kernels only)
  TORCH_CUDA_ARCH_LIST         CUDA architectures (default "8.0;9.0a")
  MAX_JOBS                     parallel compile jobs
  LOCA_KERNELS_BUILD_TYPE      CMake build type (default Release)
  CUDA_HOME (or CUDA_PATH)     the CUDA toolkit to build with: its bin/nvcc and libraries, as
                               torch.utils.cpp_extension uses it (default: the nvcc on PATH)
  LOCA_KERNELS_CMAKE_ARGS      extra CMake configure arguments, split like a shell command line,
                               e.g. "-DCUDA_nvrtc_LIBRARY=/path/to/libnvrtc.so.13" to override the
                               library CMakeLists.txt takes from torch's CUDA wheel (site-packages/
                               nvidia/*/lib) for each one the toolkit lacks
"""
import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        cuda = os.environ.get("LOCA_KERNELS_CUDA", "auto")
        if cuda not in ("auto", "0", "1"):
            raise ValueError(f"LOCA_KERNELS_CUDA must be auto, 0 or 1, got {cuda!r}")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", str(ROOT), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('LOCA_KERNELS_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DLOCA_KERNELS_CUDA={cuda}",
        ] + shlex.split(os.environ.get("LOCA_KERNELS_CMAKE_ARGS", ""))
        build = ["cmake", "--build", ".", "--target", "_C"]
        if os.environ.get("MAX_JOBS"):
            build += ["-j", os.environ["MAX_JOBS"]]
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(build, cwd=build_dir, check=True)


setup(
    name="loca_kernels",
    version="0.1.0",
    description="Fused kernels for LOCA location-aware self-supervised ViT pretraining",
    packages=find_packages(include=["loca_kernels", "loca_kernels.*"])
    + find_packages("python", include=["loca_train", "loca_train.*"]),
    package_dir={"loca_train": "python/loca_train"},
    ext_modules=[CMakeExtension("loca_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    # pillow: the trainer reads image folders and the evaluation draws eval.png with it.
    # scikit-image: the photo scenes (its bundled photographs), the default training and evaluation set.
    install_requires=["torch>=2.10", "numpy", "pillow", "scikit-image"],
    # plot: python -m loca_train.plot and benchmarks/report.py, checked before they read anything.
    extras_require={"plot": ["matplotlib"], "test": ["pytest", "pytest-benchmark", "triton"]},
)
