"""Build script for calibops' compiled ops.

- The C++ CPU ops (csrc/ops.cpp + csrc/cpu/*.cpp) are built whenever torch is importable at build time
  (install with ``pip install --no-build-isolation -e .`` so the build sees *your* torch).
- The CUDA ops (csrc/cuda/*.cu + csrc/cuda/*.cpp) are added when torch has CUDA and nvcc is found.
- Knobs (environment variables):
    CALIBOPS_NO_EXT=1       build nothing compiled (pure Python: reference + Triton backends)
    CALIBOPS_NO_CUDA=1      skip the CUDA ops even where they could be built
    CALIBOPS_FORCE_CUDA=1   build the CUDA ops even if no GPU is visible (needs torch with CUDA + nvcc)
    CALIBOPS_REQUIRE_EXT=1  fail the install if the extension does not build (default: warn, go on)
    CALIBOPS_CPU_FLAGS      extra C++ flags for the CPU kernels (default: "-O3"); the kernels are also built
                            for AVX2 and AVX-512 and the best one the CPU runs is picked at run time
                            (CALIBOPS_CPU_ISA=base|avx2|avx512 forces one), so no -march flag is needed
    CALIBOPS_CUDA_ARCH      TORCH_CUDA_ARCH_LIST for the CUDA ops (default: torch's own choice)
    CUDA_HOME               the CUDA toolkit to build with. Unset and torch has CUDA: torch would take the
                            folder above `which nvcc`, which is wrong where nvcc is a wrapper script or link
                            outside the toolkit (then `cuda_runtime.h: No such file`, or no CUDA ops at all);
                            setup.py therefore looks for a toolkit (bin/nvcc + include/cuda_runtime.h) at the
                            resolved nvcc, /usr/local/cuda-<torch's CUDA>, /usr/local/cuda, /usr/local/cuda-*,
                            /opt/cuda and sets CUDA_HOME to the first one found (printed)
- The package never *needs* the extension: without it, `calibops` imports and `available_backends()`
  says why the compiled backends are missing.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _is_cuda_toolkit(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def find_cuda_home(torch_cuda: str | None) -> str | None:
    """The CUDA toolkit folder to build with when CUDA_HOME / CUDA_PATH are unset, else None.

    torch.utils.cpp_extension takes the folder above ``which nvcc``; where nvcc is a wrapper script (or a
    link) outside the toolkit, that folder has no CUDA headers. This looks at the folder above nvcc, the
    folder above the resolved nvcc, then the usual install places, preferring toolkits of torch's CUDA major
    version (``torch_cuda``, e.g. "13.0")."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return None

    def version(path: str) -> tuple[int, ...]:
        tail = path.rsplit("cuda-", 1)[-1]
        return tuple(int(v) for v in tail.split(".") if v.isdigit())

    major = int(torch_cuda.split(".")[0]) if torch_cuda and torch_cuda.split(".")[0].isdigit() else None
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [os.path.dirname(os.path.dirname(p)) for p in (nvcc, os.path.realpath(nvcc))]
    if torch_cuda:
        candidates.append(f"/usr/local/cuda-{torch_cuda}")
    candidates.append("/usr/local/cuda")
    # newest first, torch's major version before the others
    others = sorted(glob.glob("/usr/local/cuda-*"), key=version, reverse=True)
    candidates += sorted(others, key=lambda p: version(p)[:1] != (major,)) + ["/opt/cuda"]
    return next((p for p in candidates if _is_cuda_toolkit(p)), None)


def _extensions_and_cmdclass():
    if _flag("CALIBOPS_NO_EXT"):
        return [], {}
    try:
        import torch

        # before cpp_extension is imported: it reads CUDA_HOME once, at import
        cuda_home = find_cuda_home(torch.version.cuda) if torch.version.cuda is not None else None
        if cuda_home is not None:
            os.environ["CUDA_HOME"] = cuda_home
            print(f"calibops: CUDA_HOME={cuda_home} (found by setup.py; set CUDA_HOME to choose another)")
        from torch.utils import cpp_extension

        if cuda_home is not None:
            cpp_extension.CUDA_HOME = cuda_home  # in case another module imported it first
    except ImportError:
        msg = (
            "calibops: torch is not importable at build time, so the C++/CUDA backends are not built. "
            "Install torch first and use `pip install --no-build-isolation -e .` to build them."
        )
        if _flag("CALIBOPS_REQUIRE_EXT"):
            raise RuntimeError(msg) from None
        warnings.warn(msg, stacklevel=1)
        return [], {}

    def rel(pattern: str) -> list[str]:
        return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))

    sources = rel("csrc/ops.cpp") + rel("csrc/cpu/*.cpp")
    cpu_flags = os.environ.get("CALIBOPS_CPU_FLAGS", "-O3").split()
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # No FMA contraction: the base/AVX2/AVX-512 builds of csrc/cpu (picked at run time, see
    # csrc/cpu/kernel_avx2.cpp) then round identically and give bitwise equal results on every x86 CPU.
    # No trapping math (results unchanged: nothing here traps on FP exceptions) lets GCC if-convert the
    # branch-free selects of the kernels' inner loops and vectorise them (softmax exp, binning).
    strict_fp = ["-ffp-contract=off", "-fno-trapping-math"] if sys.platform != "win32" else []
    # no -std flag: torch adds the C++ standard its own headers need (C++17 or C++20)
    cxx_flags = [*cpu_flags, *strict_fp, *openmp]
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    link_args = list(openmp)

    want_cuda = (
        not _flag("CALIBOPS_NO_CUDA")
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and (torch.cuda.is_available() or _flag("CALIBOPS_FORCE_CUDA"))
    )
    if want_cuda and os.environ.get("CALIBOPS_CUDA_ARCH"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["CALIBOPS_CUDA_ARCH"]

    if want_cuda:
        sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
        ext = cpp_extension.CUDAExtension(
            "calibops._C",
            sources,
            define_macros=[*define_macros, ("CALIBOPS_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo"],
            },
            extra_link_args=link_args,
        )
    else:
        ext = cpp_extension.CppExtension(
            "calibops._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_args,
        )

    use_ninja = shutil.which("ninja") is not None
    base = cpp_extension.BuildExtension.with_options(use_ninja=use_ninja)

    class OptionalBuildExtension(base):
        """Builds the extension; a failed build warns and installs the pure-Python package instead."""

        def run(self):
            try:
                super().run()
                stale = os.path.join(os.path.dirname(self.get_ext_fullpath("calibops._C")), "_build_failed.txt")
                if os.path.exists(stale):
                    os.remove(stale)
            except Exception as exc:  # noqa: BLE001 - any compiler failure must not break install
                if _flag("CALIBOPS_REQUIRE_EXT"):
                    raise
                # calibops/backends/extension.py warns at import when this file is there (pip hides this build's output)
                marker = os.path.join(os.path.dirname(self.get_ext_fullpath("calibops._C")), "_build_failed.txt")
                os.makedirs(os.path.dirname(marker), exist_ok=True)
                with open(marker, "w") as f:
                    f.write(" ".join(f"{type(exc).__name__}: {exc}".split())[:500])
                warnings.warn(
                    f"calibops: building the compiled ops failed ({exc}); installing without them. "
                    "Set CALIBOPS_REQUIRE_EXT=1 to make this an error.",
                    stacklevel=1,
                )

    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
