"""Build script for fastdino's optional C++ CPU backend (``fastdino._C``).

The extension is compiled against the torch that is importable while building, which is the
installed torch only with ``pip install --no-build-isolation``. Whenever it cannot be built (no
torch in the build environment, no C++ compiler, a compile error) the package still installs;
``fastdino.ops.backend_status()`` then says why the "cpp" backend is unavailable.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

EXTENSION_NAME = "fastdino._C"
# -O3 with auto-vectorization, but no -march=native: wheels and shared clusters must run on any
# x86-64. The hot loops use target_clones (see csrc/cpu_math.h) to get AVX2/AVX-512 variants
# chosen at load time. -fno-math-errno lets the compiler vectorize sqrt; we never use errno.
COMPILE_ARGS = ["-O3", "-fopenmp", "-fno-math-errno"]
LINK_ARGS = ["-fopenmp"]


def _warn(message):
    bar = "=" * 78
    print(f"\n{bar}\nfastdino: {message}\n{bar}\n", file=sys.stderr)


def _cpp_extension_setup():
    if os.environ.get("FASTDINO_SKIP_CPP") == "1":
        _warn("FASTDINO_SKIP_CPP=1: installing without the C++ backend.")
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _warn(
            "torch is not importable in the build environment (PEP 517 build isolation?), so the "
            "C++ backend is NOT built. Install torch first, then: "
            "pip install --no-build-isolation -e ."
        )
        return {}

    class OptionalBuildExtension(BuildExtension):
        """Builds the extension but never fails the install because of it."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # compiler missing, bad toolchain, ...
                _warn(f"the C++ backend could not be built and is unavailable: {error}")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    extension = CppExtension(
        EXTENSION_NAME,
        sources,
        extra_compile_args=COMPILE_ARGS,
        extra_link_args=LINK_ARGS,
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(
    # The Triton kernels live in the top-level kernels/ folder but install as fastdino.kernels.
    package_dir={"fastdino.kernels": "kernels"},
    packages=find_packages(include=["fastdino", "fastdino.*"]) + ["fastdino.kernels"],
    **_cpp_extension_setup(),
)
