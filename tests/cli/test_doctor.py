"""A first run that explains itself: the kernel build is said once on stderr (terminal or not) and happens when
the model loads, before any image is timed; `upscale doctor` says what this machine would run."""

import json
import shutil

import pytest
import torch
from conftest import run

from upscale import registry
from upscale.cli import _load_upscaler
from upscale.engine import EngineOptions
from upscale.models import kernels
from upscale.reporter import Reporter

pytestmark = pytest.mark.usefixtures("cpu_kernels")


def test_the_kernel_build_is_announced_once_at_load_time(tmp_path, monkeypatch, capsys):
    built = kernels.describe()
    if built["state"] not in ("built", "loaded") or not built.get("path"):
        pytest.skip(f"the CPU kernels are not available here: {built}")
    monkeypatch.setattr(kernels, "_state", {})  # as in a fresh process
    target = tmp_path / "kernels" / "upscale_cpu.so"
    monkeypatch.setattr(kernels, "_library_path", lambda cxx: target)
    builds = []

    def fake_build(cxx, path, announce):  # the real compile takes ~15 s: copy the library built already
        builds.append(path)
        announce(kernels.BUILDING) if announce else None
        path.parent.mkdir(parents=True)
        shutil.copy(built["path"], path)

    monkeypatch.setattr(kernels, "_build", fake_build)
    # the library is already registered in this process (the fixture): loading it twice would abort
    monkeypatch.setattr(kernels.torch.ops, "load_library", lambda path: None)
    options = EngineOptions(device="cpu")
    upscaler = _load_upscaler(registry.resolve("agdn", 2), None, options, report=Reporter(as_json=True))
    assert builds == [target] and kernels.describe()["state"] == "loaded"
    err = capsys.readouterr().err
    assert err.count("building the CPU kernels for this machine (once, ~15 s)") == 1  # JSON mode too
    # the model is ready: the first image does not build anything
    upscaler.run(torch.rand(1, 3, 20, 20))
    assert builds == [target]
    _load_upscaler(registry.resolve("agdn", 2), None, options, report=Reporter(quiet=True))
    assert capsys.readouterr().err == "" and builds == [target]


def test_doctor_says_device_precision_kernels_and_formats():
    result = run("doctor")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for expected in ("devices: cpu", "default cpu in fp32", "CPU kernels (AGDN, ESC, ASID):", "cache:", "PNG   read + write",
                     "GIF   read + write"):
        assert expected in text, text
    report = json.loads(run("doctor", "--json").stdout)
    assert report["default_device"] == "cpu" and report["default_precision"] == "fp32"
    assert report["formats"]["PNG"] == {"read": True, "write": True, "via": "Pillow", "deep": "16-bit (imagecodecs)"}
    assert report["formats"]["HEIF"]["deep"] == "10-bit (pillow-heif)" and report["formats"]["AVIF"]["deep_read"]
    assert report["cpu_kernels"]["state"] in ("built", "loaded", "unavailable", "not built yet (built on first "
                                                                                "use, ~15 s)")
