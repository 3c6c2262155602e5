"""The weights pipeline: shipped files, conversion, strict loading, resolution order, no pickle at run time."""

import subprocess
import sys

import pytest
import torch
from conftest import AGDN_PTH, need
from safetensors import safe_open
from safetensors.torch import load_file

from upscale import registry
from upscale.weights import (
    WeightsError,
    candidate_paths,
    convert_checkpoint,
    load_model,
    packaged_weights_dir,
    read_safetensors,
    resolve_weights,
    sha256_of,
)

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # runs AGDN on the CPU

UPSCALE = [sys.executable, "-m", "upscale.cli"]


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_shipped_agdn_weights_equal_a_fresh_conversion_of_the_official_checkpoint(scale, tmp_path):
    pth = need(AGDN_PTH / f"AGDN_x{scale}.pth")
    out = tmp_path / "converted.safetensors"
    run = subprocess.run([*UPSCALE, "convert", str(pth), "-o", str(out), "-m", "agdn", "-s", str(scale)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    entry = registry.resolve("agdn", scale)
    shipped = load_file(packaged_weights_dir() / entry.file)
    fresh = load_file(out)
    assert shipped.keys() == fresh.keys() and len(shipped) == 492
    assert all(torch.equal(shipped[k], fresh[k]) for k in shipped)
    official = torch.load(pth, map_location="cpu", weights_only=True)["params_ema"]
    assert all(torch.equal(official[k], fresh[k]) for k in official)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["source_sha256"] == sha256_of(pth) == entry.sha256
    assert meta["source_key"] == "params_ema" and meta["model"] == "agdn" and meta["scale"] == str(scale)


def test_official_checkpoint_sums_match_the_registry():
    sums = need(AGDN_PTH / "SHA256SUMS").read_text().split("\n")
    for line in filter(None, sums):
        digest, name = line.split()
        scale = int(name.split("_x")[1][0])
        assert registry.resolve("agdn", scale).sha256 == digest


def test_convert_detects_the_model_without_flags(tmp_path):
    pth = need(AGDN_PTH / "AGDN_x3.pth")
    entry = convert_checkpoint(pth, tmp_path / "w.safetensors")
    assert entry.label == "agdn x3"


def test_convert_rejects_weights_of_another_model(tmp_path):
    pth = need(AGDN_PTH / "AGDN_x2.pth")
    with pytest.raises(WeightsError, match="not agdn x4 weights.*wrong shape.*upsampler.0.weight"):
        convert_checkpoint(pth, tmp_path / "w.safetensors", registry.resolve("agdn", 4))
    assert not any(tmp_path.iterdir()), "a failed conversion must leave no file"


def test_convert_refuses_a_checkpoint_with_unexpected_and_missing_keys(tmp_path):
    pth = need(AGDN_PTH / "AGDN_x4.pth")
    state = torch.load(pth, map_location="cpu", weights_only=True)["params_ema"]
    state["extra.weight"] = torch.zeros(1)
    del state["c1.bias"]
    bad = tmp_path / "bad.pth"
    torch.save({"params_ema": state}, bad)
    with pytest.raises(WeightsError, match=r"1 missing: c1.bias; 1 unexpected: extra.weight"):
        convert_checkpoint(bad, tmp_path / "w.safetensors", registry.resolve("agdn", 4))


def test_run_time_never_unpickles(tmp_path):
    pth = need(AGDN_PTH / "AGDN_x4.pth")
    with pytest.raises(WeightsError, match="pickled checkpoint; convert it first"):
        read_safetensors(pth)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable .safetensors"):
        load_model(registry.resolve("agdn", 4), corrupt)


def test_resolution_order_prefers_weights_dir_then_cache_then_package(tmp_path, monkeypatch):
    entry = registry.resolve("agdn", 4)
    wdir, cache = tmp_path / "wdir", tmp_path / "cache"
    monkeypatch.setenv("UPSCALE_WEIGHTS_DIR", str(wdir))
    monkeypatch.setenv("UPSCALE_CACHE_DIR", str(cache))
    assert resolve_weights(entry) == packaged_weights_dir() / entry.file
    cache.mkdir()
    (cache / entry.file).write_bytes(b"x")
    assert resolve_weights(entry) == cache / entry.file
    wdir.mkdir()
    (wdir / entry.file).write_bytes(b"x")
    assert resolve_weights(entry) == wdir / entry.file
    explicit = tmp_path / "mine.safetensors"
    explicit.write_bytes(b"x")
    assert resolve_weights(entry, explicit) == explicit
    assert candidate_paths(entry)[0] == wdir / entry.file


def test_offline_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("UPSCALE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = registry.resolve("esc", 2)
    with pytest.raises(WeightsError, match=f"offline: {entry.file} for esc x2 is not in"):
        resolve_weights(entry)
    with pytest.raises(WeightsError, match="no weights for agdn-s x4: no official checkpoint is published"):
        resolve_weights(registry.resolve("agdn-s", 4))
