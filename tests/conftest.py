"""Shared test helpers: where ../shared is, golden cases, and the golden tolerance check."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # the read-only spec folder beside the repo (CI has it at the same place)
GOLDEN = SHARED / "golden"
BENCHMARKS = SHARED / "benchmarks"
AGDN_PTH = SHARED / "weights" / "agdn"


def need(path: Path) -> Path:
    """Skip (with the reason) when a ../shared folder is missing; never fail for it."""
    if not path.exists():
        pytest.skip(f"{path.relative_to(REPO.parent)} is missing (the ../shared spec folder is not beside the repo)")
    return path


@dataclass
class GoldenCase:
    name: str
    folder: Path
    meta: dict

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        # ESC stores its weights in float16 (exact values); every model runs in float32
        return {k: v.float() for k, v in load_file(self.folder / "weights.safetensors").items()}

    @property
    def io(self) -> dict[str, torch.Tensor]:
        return load_file(self.folder / "io.safetensors")

    @property
    def tolerance(self) -> tuple[float, float]:
        tol = self.meta.get("tolerance", {})
        return tol.get("max_abs", 1e-4), tol.get("mean_abs", 1e-6)


def golden_case_names(family: str) -> list[str]:
    """Every case folder of a family (new cases get picked up by the tests without edits)."""
    folder = GOLDEN / family
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "case.json").is_file())


def load_golden(family: str, name: str) -> GoldenCase:
    folder = need(GOLDEN / family / name)
    return GoldenCase(name, folder, json.loads((folder / "case.json").read_text()))


def assert_matches_golden(ours: torch.Tensor, golden: torch.Tensor, tolerance: tuple[float, float], what: str):
    """Both limits of the golden README: max |diff| and mean |diff| (the mean catches eps/GELU mistakes)."""
    assert ours.shape == golden.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(golden.shape)}"
    diff = (ours.double() - golden.double()).abs()
    max_tol, mean_tol = tolerance
    assert diff.max() <= max_tol and diff.mean() <= mean_tol, (
        f"{what}: max |diff| {diff.max():.3g} (limit {max_tol:g}), mean {diff.mean():.3g} (limit {mean_tol:g})"
    )


def upscale_cmd() -> list[str]:
    script = Path(sys.executable).parent / "upscale"
    return [str(script)] if script.exists() else [sys.executable, "-m", "upscale.cli"]


def run(*args, cwd=None):
    return subprocess.run([*upscale_cmd(), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def interrupt_once_written(args, out: Path, signum: int, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the console script with `args`, send `signum` as soon as a first output appears in `out` (a name not
    starting with a dot: not a temporary), and return how it ended."""
    import time

    proc = subprocess.Popen([*upscale_cmd(), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + timeout
        while not (out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir())):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no output appeared"
            time.sleep(0.02)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def example_tensor(name: str = "coffee.png") -> torch.Tensor:
    """An example photograph from `examples/` as a (1, 3, H, W) float32 tensor in [0, 1]."""
    from PIL import Image

    with Image.open(REPO / "examples" / name) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()


def photo_crop(dest: Path, box=(0, 0, 24, 24), **save) -> Path:
    """A small crop of the example photograph saved at `dest` (format from the extension, or `save`)."""
    from PIL import Image

    dest.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(REPO / "examples" / "cat.png") as im:
        im.convert("RGB").crop(box).save(dest, **save)
    return dest


@contextlib.contextmanager
def half_precision_goes_non_finite(module, on_call: int):
    """While inside, the `on_call`-th call of `module` made under CPU autocast returns NaN (a forced fp16/bf16
    overflow), so that the engine's fp32 fallback runs."""
    calls = {"n": 0}

    def poison(mod, args, output):
        calls["n"] += 1
        if calls["n"] == on_call and torch.is_autocast_enabled("cpu"):
            return output * float("nan")

    handle = module.register_forward_hook(poison)
    try:
        yield
    finally:
        handle.remove()


def detected(state_dict) -> tuple[str, int] | None:
    """(variant, scale) that `upscale.weights.detect` finds for a state dict, or None."""
    from upscale.weights import detect

    entry = detect(state_dict)
    return None if entry is None else (entry.name, entry.scale)


@pytest.fixture(autouse=True, scope="session")
def _test_threads():
    """UPSCALE_TEST_THREADS=1 when other heavy processes share the machine: there, two OpenMP threads
    competing for two cores slowed forwards 10-50x (measured 75 s vs 7 s). Unset: PyTorch's default."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("UPSCALE_TEST_THREADS", 0)) or previous)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def cpu_kernels():
    """Build (or find) the fused CPU kernels once, before the tests that run a model on the CPU (in this process or in
    console-script subprocesses, which then find them in the cache instead of each compiling them again).
    Modules that need them say so with `pytestmark = pytest.mark.usefixtures("cpu_kernels")`; the others
    (the registry, metrics, image I/O) start without a compile."""
    from upscale.models import kernels

    return kernels.load()


@functools.cache
def agdn_eval(dataset: str, scale: int, protocol: str = "reference", tile: int | None = None, overlap: int = 16):
    """`upscale eval`'s code path (Upscaler + evaluate) on a benchmark set; cached across test modules."""
    from upscale import registry
    from upscale.engine import EngineOptions, Upscaler
    from upscale.evaluation import evaluate

    root = need(BENCHMARKS / dataset)
    upscaler = Upscaler.load(registry.resolve("agdn", scale), options=EngineOptions(protocol, "auto", tile, overlap,
                                                                                      "cpu"))
    return evaluate(upscaler, root / "HR", root / "LR_bicubic" / f"X{scale}")


@pytest.fixture(autouse=True)
def _one_thread_in_subprocesses(monkeypatch):
    """Console-script subprocesses run one OpenMP thread: their images are tiny, and on a shared 2-core
    machine two threads made each tiny image 10x slower (0.06 s vs 0.4-1.2 s measured)."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("UPSCALE_TEST_SUBPROCESS_THREADS", "1"))


def assert_same_bits_at_any_thread_count(run, counts=(2, 1, 3, 2)):
    """`run()` under inference mode at each torch thread count in turn: every result must be the same bits as
    the first (the fused kernels fix their summation order by the layout, never by the threads)."""
    import torch

    before = torch.get_num_threads()
    try:
        with torch.inference_mode():
            runs = []
            for threads in counts:
                torch.set_num_threads(threads)
                runs.append(run())
    finally:
        torch.set_num_threads(before)
    for i, y in enumerate(runs[1:]):
        assert torch.equal(y, runs[0]), f"run {i + 1}: {int((y != runs[0]).sum())} values differ"
