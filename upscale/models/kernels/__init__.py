"""Fused CPU kernels (`cpu_kernels.cpp`), compiled on first use and cached; optional.

The CPU paths of AGDN, ESC and ASID run on them. Those networks are bound by memory passes and per-op overhead
more than by arithmetic: PyTorch runs a depthwise conv, its bias, the residual add and the GELU as four passes
over the map. `cpu_kernels.cpp` does such chains in one pass, and has the attention kernels ESC and ASID need. It is built here, not at install time, because a wheel cannot know the user's CPU
(`-march=native`) or torch build, and building against torch at install time would make pip pull a CUDA
torch into the build environment.

`load()` returns the `torch.ops.upscale_cpu` namespace, or None when the kernels cannot be had: a CPU without
AVX2 and FMA, no C++ compiler, a compile error, a platform other than Linux, or `UPSCALE_CPU_KERNELS=0`. Callers then take
AGDN's eager PyTorch fast path, or ESC's and ASID's straight modules, which compute the same values (the tests
compare them). The first build takes 10-30 s
(said on stderr when it is a terminal); the shared library is cached under the upscale cache directory, keyed
by the source, the torch version, the compiler and the CPU, and written atomically, so concurrent first runs
are safe.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from ...files import atomic_path, cache_dir

__all__ = ["GELU", "GELU_THEN_RESIDUAL", "NO_ACT", "BufferPool", "cached_on", "depthwise_taps", "gemm_operand", "layer_norm_args", "load", "status"]

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
BUILD_TIMEOUT_S = 600
_state: dict = {}


def _setting() -> str:
    return os.environ.get("UPSCALE_CPU_KERNELS", "1").strip().lower()


def _disabled() -> bool:
    return _setting() in ("0", "off", "false", "no")


def _march() -> str:
    """The compiler's target: the CPU itself, or x86-64-v3 (AVX2, FMA) when UPSCALE_CPU_KERNELS=avx2."""
    return "x86-64-v3" if _setting() == "avx2" else "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    except OSError:
        return []


def _has_avx2() -> bool:
    """Whether this CPU runs the kernels' vector code: AVX2 with FMA at least (AVX-512 F, BW, DQ and VL, when
    present, get their own code). Plain x86-64 builds are not tested, so older CPUs take the eager path."""
    flags = _cpu_flags()
    return "avx2" in flags and "fma" in flags


def _command(cxx: str, output: Path) -> list[str]:
    root = Path(torch.__file__).parent
    lib = root / "lib"
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return [
        cxx, "-O3", f"-march={_march()}", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fvisibility=hidden",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w",
        "-I", str(root / "include"), "-I", str(root / "include" / "torch" / "csrc" / "api" / "include"),
        str(SOURCE), "-o", str(output),
        "-L", str(lib), "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}",
    ]


def _library_path(cxx: str) -> Path:
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = cxx
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), version.encode(), _cpu_signature().encode(),
                 " ".join(_command(cxx, Path("out"))).encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / "kernels" / key.hexdigest()[:16] / "upscale_cpu.so"


BUILDING = "building the CPU kernels for this machine (once, ~15 s)"


def _build(cxx: str, target: Path, announce) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # said whether or not stderr is a terminal: a 15 s silence in a script's log needs its reason
    if announce is not None:
        announce(BUILDING)
    else:
        print(f"upscale: {BUILDING}", file=sys.stderr, flush=True)
    with atomic_path(target) as tmp:
        done = subprocess.run(_command(cxx, tmp), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"compiler exited {done.returncode}: {done.stderr.strip()[-2000:]}")


def load(announce=None):
    """The kernels' op namespace (`torch.ops.upscale_cpu`), or None when they are unavailable. A build, when one
    is needed, is announced through `announce(line)` (default: a line on stderr)."""
    if "ops" in _state:
        return _state["ops"]
    ops, reason = None, None
    if _disabled():
        reason = "disabled by UPSCALE_CPU_KERNELS"
    elif sys.platform != "linux":
        reason = f"not built on {sys.platform}"
    elif not _has_avx2():
        reason = "the CPU has no AVX2 and FMA (the kernels' vector code)"
    elif (cxx := _compiler()) is None:
        reason = "no C++ compiler (c++, g++ or clang++; or set CXX)"
    else:
        try:
            target = _library_path(cxx)
            if not target.exists():
                _build(cxx, target, announce)
            torch.ops.load_library(str(target))
            ops = torch.ops.upscale_cpu
            _state["path"] = str(target)
        except Exception as exc:  # any failure means the eager path, never a failed upscale
            reason = f"build failed: {exc}"
            print(f"upscale: fused CPU kernels unavailable ({str(exc).splitlines()[0][:200]}); "
                  "using the PyTorch path", file=sys.stderr)
    _state["ops"], _state["reason"] = ops, reason
    return ops


def describe() -> dict:
    """What `upscale doctor` shows, without building anything: whether the kernels are built for this machine,
    where the library is (or would be) cached, and why not when they cannot be had."""
    if "ops" in _state:
        ops = _state["ops"]
        return {"state": "loaded" if ops is not None else "unavailable", "reason": _state.get("reason"),
                "capability": ops.capability() if ops is not None else None, "path": _state.get("path")}
    if _disabled():
        return {"state": "unavailable", "reason": "disabled by UPSCALE_CPU_KERNELS"}
    if sys.platform != "linux" or not _has_avx2() or (cxx := _compiler()) is None:
        return {"state": "unavailable", "reason": "see `load` (no Linux, no AVX2+FMA or no C++ compiler)"}
    target = _library_path(cxx)
    return {"state": "built" if target.exists() else "not built yet (built on first use, ~15 s)",
            "path": str(target), "compiler": cxx}


def status() -> str:
    """One line for reports: whether the fused kernels are in use, and why not."""
    ops = load()
    return f"fused CPU kernels ({ops.capability()})" if ops is not None else f"PyTorch ops ({_state.get('reason')})"


# -- what the families' kernel paths share ------------------------------------------------------------------------

#: the `act` codes of `bias_act`, `dwconv3x3` and `pw_dwconv` (`Act` in cpu_kernels.cpp)
NO_ACT, GELU, GELU_THEN_RESIDUAL = 0, 1, 2  # the last: GELU(conv + bias) + residual, ESC's ConvFFN


def gemm_operand(weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv or linear weight (out, in[, 1, 1]) as `gemm` / `pw_dwconv` read it: (in, out), the columns
    padded with zeros to a multiple of 16."""
    return pad_columns(weight.detach().reshape(weight.shape[0], -1).t())


def pad_columns(w: torch.Tensor) -> torch.Tensor:
    """A GEMM's (in, out) matrix with zero columns up to a multiple of 16: the kernels' GEMM loads whole vectors
    of weights and stores only the real output columns."""
    return torch.nn.functional.pad(w, (0, -w.shape[1] % 16)).contiguous()


def depthwise_taps(weight: torch.Tensor) -> torch.Tensor:
    """A depthwise 3x3 weight (C, 1, 3, 3) as `dwconv3x3` / `pw_dwconv` read it: tap-major (9, C + 16), zero
    beyond C (a vector of slack: loads may run past C)."""
    c = weight.shape[0]
    return torch.nn.functional.pad(weight.detach().reshape(c, 9).t(), (0, 16)).contiguous()


def layer_norm_args(norm: torch.nn.Module | None) -> tuple:
    """The LayerNorm prologue arguments of `gemm` / `pw_dwconv` (weight, bias, eps) for a LayerNorm (nn.LayerNorm
    or a LayerNorm2d); none for None or a module without weights (nn.Identity: no norm)."""
    if norm is None or getattr(norm, "weight", None) is None:
        return ()
    return norm.weight, norm.bias, norm.eps


def cached_on(model: torch.nn.Module, make):
    """`make()` (a model's weights rearranged for the kernels), made once and kept on the model as `_fast_cache`
    until a parameter changes (a new tensor or an in-place update)."""
    key = tuple((p.data_ptr(), p._version) for p in model.parameters())
    cached = getattr(model, "_fast_cache", None)
    if cached is None or cached[0] != key:
        cached = (key, make())
        model._fast_cache = cached
    return cached[1]


class BufferPool:
    """Scratch maps reused from one forward pass to the next.

    A fresh buffer of some megabytes is a new mapping from the OS, page-faulted in 4 KiB at a time: a 21 MB map
    written by a kernel took 9 ms where the same kernel into a reused buffer took 4. `empty(shape)` hands out a
    pooled float32 tensor of that shape that nothing else references any more (only the pool holds it: views of
    a buffer keep it referenced through their base), else a new one, pooled. Buffers of other shapes are dropped
    when the pass's shape changes (`start`), so the pool holds at most one pass's working set."""

    def __init__(self):
        self.key = None
        self.buffers: dict[tuple[int, ...], list[torch.Tensor]] = {}

    @classmethod
    def of(cls, model: torch.nn.Module) -> "BufferPool":
        """The pool kept on `model` (as `_scratch`; `Architecture.release_scratch` drops it when large), made on
        first use."""
        if getattr(model, "_scratch", None) is None:
            model._scratch = cls()
        return model._scratch

    def start(self, key) -> "BufferPool":
        """Begin a pass; `key` names its shape (buffers from passes of another shape are freed)."""
        if key != self.key:
            self.key, self.buffers = key, {}
        return self

    def nbytes(self) -> int:
        return sum(t.nbytes for ts in self.buffers.values() for t in ts)

    def empty(self, *shape: int) -> torch.Tensor:
        free = self.buffers.setdefault(shape, [])
        for t in free:
            if sys.getrefcount(t) <= 3:  # the list, the loop variable and getrefcount's own argument
                return t
        t = torch.empty(shape)
        free.append(t)
        return t
