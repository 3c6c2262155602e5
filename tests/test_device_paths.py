"""The GPU code paths, run on the CPU by forcing them: the out-of-memory ladder (an injected OOM), batched
tiles, the float32/TF32 switch, blending on the device or on the host. Each is compared against the plain
path's output (fp32, one tile per forward). The same tests on a real GPU are in test_cuda.py."""

import numpy as np
import pytest
import torch
from conftest import REPO, load_golden
from PIL import Image

from upscale import memory, registry
from upscale.engine import EngineOptions, Upscaler
from upscale.options import MIN_TILE
from upscale.weights import build_model

pytestmark = pytest.mark.usefixtures("cpu_kernels")

OOM_ERRORS = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 9663676416 bytes"),
]


def photo(h: int, w: int) -> torch.Tensor:
    with Image.open(REPO / "examples" / "cat.png") as im:
        rgb = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255)
    x = rgb.permute(2, 0, 1)[None]  # 106 x 160: resampled when a test needs more pixels
    if h > x.shape[-2] or w > x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return x[..., :h, :w].contiguous()


def fail_above(model: torch.nn.Module, pixels: int, error: BaseException, counter: dict | None = None):
    """Make `model` raise `error` for an input (batch included) of more than `pixels` pixels."""

    def hook(module, args):
        x = args[0]
        if counter is not None:
            counter["calls"] = counter.get("calls", 0) + 1
        if x.shape[0] * x.shape[-2] * x.shape[-1] > pixels:
            raise error

    return model.register_forward_pre_hook(hook)


def agdn(scale: int = 2, **kw) -> Upscaler:
    return Upscaler.load(registry.resolve("agdn", scale), options=EngineOptions(device="cpu", **kw))


@pytest.mark.parametrize("error", OOM_ERRORS, ids=["torch", "cudnn", "cublas", "cpu"])
def test_out_of_memory_in_the_whole_image_pass_finishes_in_tiles_as_a_direct_tiled_run(error):
    x = photo(200, 260)
    up = agdn()
    assert memory.is_out_of_memory(error)
    handle = fail_above(up.model, 150 * 150, error)
    try:
        y, stats = up.run(x)
    finally:
        handle.remove()
    assert stats.protocol == "tiled" and MIN_TILE <= stats.tile < 150
    assert len(stats.notes) == 1, stats.notes  # said once, whatever the number of retries
    assert stats.notes[0].startswith("out of memory with the whole image (reference); finished with tiles of "
                                     f"{stats.tile}")
    direct, direct_stats = Upscaler(up.entry, up.model, up.device, "tiled", tile=stats.tile).run(x)
    assert direct_stats.notes == [] and torch.equal(y, direct)


def test_out_of_memory_at_the_smallest_tile_still_fails_and_other_errors_are_not_retried():
    up = agdn(tile=64)
    x = photo(96, 96)
    handle = fail_above(up.model, 0, torch.OutOfMemoryError("CUDA out of memory"))
    try:
        with pytest.raises(torch.OutOfMemoryError):
            up.run(x)
    finally:
        handle.remove()
    calls = {}
    handle = fail_above(up.model, 0, RuntimeError("Expected all tensors to be on the same device"), calls)
    try:
        with pytest.raises(RuntimeError, match="same device"):
            up.run(x)
    finally:
        handle.remove()
    assert calls["calls"] == 1  # not retried


def asid_upscaler(protocol: str, name: str = "asid", scale: int = 2) -> Upscaler:
    golden = load_golden("asid", f"{name}_x{scale}")
    model = build_model(registry.resolve(name, scale))
    model.load_state_dict(golden.weights)
    return Upscaler(registry.resolve(name, scale), model, protocol=protocol)


def test_block_mode_out_of_memory_halves_the_batch_first():
    up = asid_upscaler("tiled")
    up.tile_batch = 8
    x = photo(150, 170)
    one, _ = asid_upscaler("tiled").run(x)
    handle = fail_above(up.model, 2 * 64 * 64, torch.OutOfMemoryError("CUDA out of memory"))
    try:
        y, stats = up.run(x)
    finally:
        handle.remove()
    assert stats.tiles_per_forward == 2
    assert stats.notes == ["out of memory with tiles of 64, 8 per call; finished with tiles of 64, 2 per call"]
    assert (y - one).abs().max() <= 1e-5


def test_asid_reference_batches_its_official_tiles_into_few_forward_calls():
    # 256 x 256: the official tiler's 6 x 6 = 36 tiles of 64 px. One per call (the official script, and our
    # CPU default) is 36 calls; 64 per call is one. The average is formed in the same order: same result up
    # to the network's own rounding on a batch.
    x = photo(256, 256)
    calls = []
    results = {}
    for batch in (1, 8, 64):
        up = asid_upscaler("reference")
        up.tile_batch = batch
        raw = up.model.forward_raw
        up.model.forward_raw = lambda t, raw=raw: calls.append(t.shape[0]) or raw(t)
        calls.clear()
        results[batch], stats = up.run(x)
        assert sum(calls) == 36 and len(calls) == -(-36 // batch) and stats.tiles_per_forward == batch
    golden = load_golden("asid", "asid_x2")
    atol = golden.tolerance[0]
    for batch in (8, 64):
        assert (results[batch] - results[1]).abs().max() <= atol


def test_fp32_means_ieee_float32_and_tf32_is_asked_for():
    seen = []

    class Probe(torch.nn.Module):
        scale = 2

        def forward(self, x):
            seen.append(torch.backends.cuda.matmul.fp32_precision)
            seen.append(torch.backends.cudnn.conv.fp32_precision)
            return torch.nn.functional.interpolate(x, scale_factor=2)

    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    for precision, expected in (("fp32", "ieee"), ("tf32", "tf32")):
        seen.clear()
        up = Upscaler(registry.resolve("esc", 2), Probe(), protocol="whole", precision=precision)
        _, stats = up.run(torch.rand(1, 3, 8, 8))
        assert seen == [expected, expected] and stats.precision == precision
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before


@pytest.mark.parametrize("family", ["agdn", "asid"])
def test_blending_on_the_device_or_on_the_host_gives_the_same_image(family):
    x = photo(100, 140)
    up = agdn(tile=48) if family == "agdn" else asid_upscaler("tiled")
    outputs = []
    for on_device in (True, False):
        up.blend_on_device = on_device
        outputs.append(up.run(x)[0])
    assert torch.equal(*outputs)


def test_free_cache_and_budget_work_on_the_cpu():
    memory.free_cache(torch.device("cpu"))
    assert 0 < memory.budget(torch.device("cpu")) <= 768 << 20
    assert not memory.is_out_of_memory(ValueError("out of memory"))  # only runtime errors are allocation failures
