"""Reading and writing off the happy path: leftovers of killed writes, damaged headers, huge metadata, files with
and float arrays on the wrong scale. Through the console script where a user meets them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, photo_crop, run
from PIL import PngImagePlugin

import upscale
from upscale.api import upscale_planes
from upscale.files import _HOST

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # runs AGDN on the CPU

CAT = REPO / "examples" / "cat.png"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_removes_only_the_stale_temporaries_of_its_own_killed_writes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old = time.time() - 3600
    stale = out / f".a_x2.png.upscale-{_HOST}-{dead_pid()}-k3x9q2ab.part"  # killed on this machine
    legacy = out / ".a_x2.png.k3x9q2ab.part"  # an earlier version's name, two days old
    keep = {
        "live": out / f".b_x2.png.upscale-{_HOST}-{os.getpid()}-zzzzzzzz.part",  # a writer still running
        "other host, recent": out / ".c_x2.png.upscale-0a0b0c-4242-abcdefgh.part",
        "user's": out / ".notes.part",
        "near miss": out / f".d.png.upscale-{_HOST}-{dead_pid()}-short.part",
        "fresh legacy": out / ".e.png.abcdefgh.part",
    }
    for path in (stale, legacy, *keep.values()):
        path.write_bytes(b"partial")
        os.utime(path, (old, old))
    two_days = time.time() - 2 * 86400
    os.utime(legacy, (two_days, two_days))
    os.utime(keep["fresh legacy"], None)  # now: may belong to a run under way
    result = run(photo_crop(tmp_path / "a.png"), "-s", "2", "-o", out / "a_x2.png")
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and not legacy.exists()
    assert all(p.exists() for p in keep.values()), [k for k, p in keep.items() if not p.exists()]
    assert (out / "a_x2.png").is_file()


def test_a_png_with_a_damaged_header_is_a_corrupt_image_named_or_in_a_folder(tmp_path):
    data = bytearray(photo_crop(tmp_path / "ok.png").read_bytes())
    data[29] ^= 0xFF  # the IHDR chunk's CRC
    folder = tmp_path / "shots"
    folder.mkdir()
    (folder / "crc.png").write_bytes(bytes(data))
    for target in (folder / "crc.png", folder):
        result = run(target, "-s", "2", "--json")
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "crc.png: corrupt PNG image" in lines[0], result.stderr
        record = json.loads(result.stdout.splitlines()[0])
        assert record["status"] == "failed"  # an input that failed, not a non-image skipped


def test_allow_large_also_lifts_the_text_chunk_limit(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "x" * 20_000_000, zip=True)  # 20 MB of metadata, 20 KB on disk
    src = photo_crop(tmp_path / "meta.png", pnginfo=info)
    refused = run(src, "-s", "2", "-o", tmp_path / "no.png")
    assert refused.returncode == 1 and not (tmp_path / "no.png").exists()
    assert "text chunk" in refused.stderr and "--allow-large" in refused.stderr
    done = run(src, "-s", "2", "-o", tmp_path / "yes.png", "--allow-large")
    assert done.returncode == 0, done.stderr
    # the lifted limit stays with that read: Pillow's module-wide limits are as they were
    assert PngImagePlugin.MAX_TEXT_CHUNK == 1024 * 1024


@pytest.fixture(scope="module")
def agdn2():
    return upscale.load_model("agdn", 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_arrays_outside_0_1_and_empty_arrays_are_refused_clearly(agdn2, dtype):
    rng = np.random.default_rng(0)
    base = rng.random((16, 16, 3)).astype(dtype)
    near = base * (1 + 5e-4) - 2e-4  # rounding in the caller's arithmetic: accepted, clipped
    out = upscale.upscale_image(agdn2, near)
    assert out.dtype == dtype and out.shape == (32, 32, 3) and 0 <= out.min() and out.max() <= 1
    bad = {"0-255 data": base * 255, "negative": base - 0.5, "NaN": np.where(base > 0.5, np.nan, base)}
    for what, a in bad.items():
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            upscale.upscale_image(agdn2, a.astype(dtype))
    for shape in [(0, 0, 3), (0, 16, 3), (16, 0, 3), (0, 0), (16,), (1, 16, 16, 3)]:
        with pytest.raises(ValueError, match="empty|expected"):
            upscale.upscale_image(agdn2, np.zeros(shape, dtype))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        upscale_planes(agdn2, base * 255)
