"""The single-image command line, run as a user runs it: the real console script in a subprocess."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run
from PIL import Image

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # runs AGDN on the CPU

EXAMPLE = REPO / "examples" / "cat.png"


@pytest.fixture
def photo(tmp_path) -> Path:
    """A small real photograph (a crop of the example) in a private folder."""
    dest = tmp_path / "photo.png"
    Image.open(EXAMPLE).crop((40, 20, 88, 60)).save(dest)
    return dest


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_default_job_writes_a_4x_png_beside_the_input(photo):
    result = run(photo)
    assert result.returncode == 0, result.stderr
    out = photo.with_name("photo_x4.png")
    with Image.open(out) as im:
        assert im.size == (48 * 4, 40 * 4) and im.mode == "RGB"
        assert im.text["upscale:model"] == "agdn" and im.text["upscale:scale"] == "4"
        sr = np.asarray(im, dtype=np.float64)
    # the upscale must look like the input: downscaled back, it is close to the source
    small = np.asarray(Image.fromarray(sr.astype(np.uint8)).resize((48, 40), Image.BICUBIC), dtype=np.float64)
    src = np.asarray(Image.open(photo), dtype=np.float64)
    assert np.abs(small - src).mean() < 4.0
    assert files_in(photo.parent) == {"photo.png", "photo_x4.png"}


def test_output_path_scale_and_json(photo, tmp_path):
    out = tmp_path / "big.png"
    result = run(photo, "-s", "2", "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    record, summary = map(json.loads, result.stdout.strip().splitlines())
    assert record["status"] == "ok" and record["output"] == str(out) and record["scale"] == 2
    assert summary["summary"] and summary["ok"] == 1 and summary["failed"] == 0
    assert Image.open(out).size == (96, 80)


def test_existing_output_is_kept_unless_overwrite(photo):
    existing = photo.with_name("photo_x4.png")
    existing.write_bytes(b"precious")
    result = run(photo)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {existing}: already exists (use --overwrite to replace it)"
    assert existing.read_bytes() == b"precious"
    assert run(photo, "--overwrite").returncode == 0
    assert Image.open(existing).size == (192, 160)


def test_never_writes_over_the_input_even_with_overwrite(photo):
    before = photo.read_bytes()
    result = run(photo, "-o", photo, "--overwrite")
    assert result.returncode == 1
    assert "refusing to write over the input image" in result.stderr
    assert photo.read_bytes() == before


def _one_line_error(result, *needles):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.png"
    result = run(missing)
    _one_line_error(result, str(missing), "no such file")
    assert result.returncode == 1 and files_in(tmp_path) == set()


def test_not_an_image(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture\n")
    result = run(text)
    _one_line_error(result, str(text), "not an image")
    assert files_in(tmp_path) == {"notes.png"}


def test_truncated_png(tmp_path, photo):
    data = photo.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    result = run(cut)
    _one_line_error(result, str(cut), "truncated")
    assert files_in(tmp_path) == {"photo.png", "cut.png"}


def test_unknown_model(photo):
    result = run(photo, "-m", "agdn-xxl")
    _one_line_error(result, "unknown model 'agdn-xxl'", "agdn, agdn-s")
    assert result.returncode == 2 and files_in(photo.parent) == {"photo.png"}


def test_wrong_scale_for_a_model(photo):
    result = run(photo, "-m", "agdn-s", "-s", "2")
    _one_line_error(result, "'agdn-s' has no x2 weights; valid scales: x4")
    assert result.returncode == 2 and files_in(photo.parent) == {"photo.png"}


def test_subcommands_sit_beside_the_default_command(tmp_path):
    help_text = run("--help").stdout
    for sub in ("models", "fetch", "convert", "eval"):
        assert sub in help_text
    listing = run("models", "--json")
    assert listing.returncode == 0
    rows = [json.loads(line) for line in listing.stdout.splitlines()]
    assert len(rows) == 26
    agdn4 = next(r for r in rows if r["model"] == "agdn" and r["scale"] == 4)
    assert agdn4["weights"] and agdn4["params"] == 294174


def test_weights_file_without_model_is_detected(photo, tmp_path):
    from upscale.weights import packaged_weights_dir

    w = tmp_path / "mine.safetensors"
    shutil.copy(packaged_weights_dir() / "agdn_x2.safetensors", w)
    out = tmp_path / "o.png"
    result = run(photo, "--weights", w, "-o", out)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (96, 80)


def test_small_tiles_give_the_whole_image_result(tmp_path):
    # a 64 x 64 photo at x4: tiles of 32-48 px once came out mostly white (seam weights counted too few tiles)
    src = tmp_path / "c64.png"
    Image.open(EXAMPLE).convert("RGB").crop((0, 0, 64, 64)).save(src)
    whole = run(src, "-o", tmp_path / "whole.png")
    assert whole.returncode == 0, whole.stderr
    reference = np.asarray(Image.open(tmp_path / "whole.png"), dtype=np.float64)
    for tile in (32, 40, 48):
        result = run(src, "--tile", tile, "-o", tmp_path / f"t{tile}.png")
        assert result.returncode == 0, result.stderr
        tiled = np.asarray(Image.open(tmp_path / f"t{tile}.png"), dtype=np.float64)
        psnr = 10 * np.log10(255**2 / ((tiled - reference) ** 2).mean())
        assert psnr >= 50, f"--tile {tile}: {psnr:.1f} dB against the whole image"


def _edited_weights(tmp_path: Path, name: str, edit) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(REPO / "upscale" / "weights" / "agdn_x2.safetensors"))
    edit(tensors)
    dest = tmp_path / name
    save_file(tensors, str(dest))
    return dest


@pytest.mark.parametrize("model_args", [(), ("-m", "agdn", "-s", "2")])
def test_non_finite_weights_are_a_load_error_naming_the_tensor(photo, tmp_path, model_args):
    def poison(tensors):
        tensors["B3.cca.dwconv.weight"][0, 0, 1, 1] = float("nan")

    bad = _edited_weights(tmp_path, "nan.safetensors", poison)
    out = tmp_path / "out.png"
    result = run(photo, "--weights", bad, *model_args, "-o", out)
    assert result.returncode == 2 and not out.exists()  # a bad --weights file is a usage error, -m or not
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "B3.cca.dwconv.weight" in lines[0], result.stderr
    assert "non-finite" in lines[0] and "Traceback" not in result.stderr


def test_non_finite_output_in_fp32_fails_the_image_without_a_black_file(photo, tmp_path):
    def overflow(tensors):  # finite weights whose products overflow float32: the output is NaN/Inf
        tensors["fea_conv.weight"] *= 1e38

    weights = _edited_weights(tmp_path, "huge.safetensors", overflow)
    out = tmp_path / "out.png"
    result = run(photo, "--weights", weights, "-o", out, "--json")
    assert result.returncode == 1 and not out.exists(), result.stderr
    record = json.loads(result.stdout.splitlines()[0])
    assert record["status"] == "failed" and "NaN or Inf" in record["error"]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(photo) in lines[0] and "NaN or Inf" in lines[0], result.stderr
    assert "RuntimeWarning" not in result.stderr


@pytest.mark.parametrize("device", ["tpu", "cuda:7", "cuda", "cpu:3"])
def test_unavailable_device_is_one_line_usage_error(photo, device):
    if device.startswith("cuda") and device != "cuda:7":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    result = run(photo, "--device", device, "-o", photo.with_name("out.png"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and device in lines[0] and "available: cpu" in lines[0], result.stderr


def test_models_fits_80_columns_one_line_per_variant(monkeypatch):
    from upscale import registry

    monkeypatch.setenv("COLUMNS", "80")
    result = run("models")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    variants = registry.variant_names()
    assert len(lines) <= len(variants) + 8, result.stdout
    assert max(len(line.rstrip()) for line in lines) <= 80, result.stdout
    for name in variants:  # each variant on exactly one line, its scales together
        rows = [line for line in lines if line.split() and line.split()[0] == name]
        assert len(rows) == 1, (name, result.stdout)
        assert " ".join(f"x{s}" for s in registry.scales_of(name)) in rows[0]
    agdn = next(line for line in lines if line.split()[:1] == ["agdn"])
    assert "MIT" in agdn and "Set5 32.43" in agdn
    assert "upscale fetch MODEL -s N" in result.stdout  # the next step for absent weights


def test_the_readme_example_can_be_run_twice(tmp_path):
    from conftest import REPO

    block = REPO.joinpath("README.md").read_text().split("```sh", 1)[1].split("```", 1)[0]
    command = next(line for line in block.splitlines() if line.startswith("upscale "))
    (tmp_path / "examples").mkdir()
    shutil.copy(REPO / "examples" / "cat.png", tmp_path / "examples" / "cat.png")
    for attempt in (1, 2):
        result = run(*command.split()[1:], cwd=tmp_path)
        assert result.returncode == 0, (attempt, result.stderr)
    assert sorted(p.name for p in (tmp_path / "examples").iterdir()) == ["cat.png", "cat_x4.png"]


def test_help_is_complete_every_option_says_what_it_does():
    import click

    from upscale.cli import main

    top = run("--help").stdout
    commands = top.split("Commands:")[1]
    assert "..." not in commands  # no command description cut short
    for name, command in main.commands.items():
        text = run(name, "--help").stdout
        assert "Exit codes:" in text or name == "models", name
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.help, f"upscale {name} {param.opts[0]} has no help"
    run_help = run("run", "--help").stdout
    for protocol in ("auto:", "reference:", "whole:", "tiled:"):
        assert protocol in run_help
    assert "at least 32" in run_help
    fetch_help = run("fetch", "--help").stdout
    assert "--offline" in fetch_help and "Exit codes:" in fetch_help


def test_fetch_offline_says_what_is_cached_and_downloads_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("UPSCALE_CACHE_DIR", str(tmp_path))
    present = run("fetch", "agdn", "--offline")  # shipped inside the package
    assert present.returncode == 0 and "agdn x4:" in present.stderr
    missing = run("fetch", "esc-light", "-s", "2", "--offline")
    assert missing.returncode == 1 and missing.stderr.count("error:") == 1
    assert "upscale fetch esc-light -s 2" in missing.stderr and list(tmp_path.iterdir()) == []
    assert run("fetch", "agdn", "--offline", "--force").returncode == 2
