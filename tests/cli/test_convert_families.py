"""`upscale convert` on every golden case of every family, then the converted file used by `upscale IMAGE`.

Each golden state dict is saved as a .pth with its family's official layout (AGDN and ESC: under
`params_ema`, next to a decoy `params` holding other values, as the real BasicSR checkpoints have; ASID: a
plain state dict) and converted by the real console script, once with -m/-s and once with detection. The
safetensors must hold exactly the golden tensors (float32) and the provenance; the image run must give the
right size. Broken checkpoints must fail in one line with exit code 1 and leave no file.

The -m/-s conversion and the image run go through the installed console script in a fresh interpreter, as a
user runs them; the detecting conversion of each case runs the same `upscale.cli.main` in-process through
click's runner (one interpreter start less per case: each start imports torch).
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN, REPO, golden_case_names, load_golden, need
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from upscale import registry
from upscale.weights import sha256_of

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # runs AGDN on the CPU

EXAMPLE = REPO / "examples" / "cat.png"
FAMILY_KEY = {"agdn": "params_ema", "esc": "params_ema", "asid": ""}
CASES = [(family, name) for family in ("agdn", "esc", "asid") for name in golden_case_names(family)]


def upscale_cmd() -> list[str]:
    script = Path(sys.executable).parent / "upscale"
    return [str(script)] if script.exists() else [sys.executable, "-m", "upscale.cli"]


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*upscale_cmd(), *map(str, args)], capture_output=True, text=True)


def cli_in_process(*args) -> subprocess.CompletedProcess:
    from click.testing import CliRunner

    from upscale.cli import main

    result = CliRunner().invoke(main, list(map(str, args)))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def require_family(family: str):
    if family == "esc":
        try:
            import upscale.models.esc  # noqa: F401
        except ImportError:
            pytest.skip("ESC model not landed")


def registry_name(meta: dict) -> str:
    """case.json `variant` -> our variant name: "ESC (DIV2K)" -> esc, "ESC-XL (DF2K)" -> esc-xl,
    "ESC (DFLIP)" -> esc-dflip, "ESC-Real (GAN, x4)" -> esc-real, "ASIDd8" -> asid-d8, "AGDN-S" -> agdn-s."""
    base, _, detail = meta["variant"].partition(" (")
    name = base.strip().lower().replace("asidd8", "asid-d8")
    if detail.upper().startswith("DFLIP"):
        name += "-dflip"
    assert name in registry.variant_names(), f"case {meta['case']}: variant {meta['variant']!r} -> {name!r}?"
    return name


def detected_name(name: str) -> str:
    return "esc" if name == "esc-dflip" else name  # DIV2K and DFLIP weights have the same shapes


def official_pth(family: str, state: dict[str, torch.Tensor], dest: Path) -> Path:
    key = FAMILY_KEY[family]
    if key:
        decoy = {k: v + 0.5 if v.is_floating_point() else v for k, v in state.items()}
        torch.save({"params": decoy, key: state}, dest)
    else:
        torch.save(state, dest)
    return dest


def one_error_line(result: subprocess.CompletedProcess, *needles: str, code: int = 1):
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].lower().startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("photo") / "cat24.png"
    Image.open(EXAMPLE).convert("RGB").crop((40, 20, 64, 44)).save(dest)
    return dest


@pytest.mark.parametrize("family,case", CASES, ids=[c for _, c in CASES])
def test_convert_every_golden_case_then_upscale_with_it(family, case, tmp_path, photo):
    require_family(family)
    golden = load_golden(family, case)
    name, scale = registry_name(golden.meta), int(golden.meta["scale"])
    entry = registry.resolve(name, scale)
    state = golden.weights
    pth = official_pth(family, state, tmp_path / f"{case}.pth")

    outputs = {}
    for how, run, flags in (("given", cli, ["-m", name, "-s", scale]), ("detected", cli_in_process, [])):
        out = tmp_path / f"{case}_{how}.safetensors"
        result = run("convert", pth, "-o", out, *flags)
        assert result.returncode == 0, result.stderr
        label = f"{name if how == 'given' else detected_name(name)} x{scale}"
        assert f"({label})" in result.stderr, result.stderr  # the model used, detected or given
        converted = load_file(out)
        assert converted.keys() == state.keys()
        for k, v in state.items():
            assert converted[k].dtype == torch.float32 and torch.equal(converted[k], v), f"{case}: {k} differs"
        with safe_open(str(out), "pt") as f:
            meta = f.metadata()
        assert meta["model"] == label.split(" x")[0] and meta["family"] == family and meta["scale"] == str(scale)
        assert meta["source_file"] == pth.name and meta["source_sha256"] == sha256_of(pth)
        assert meta["source_key"] == FAMILY_KEY[family]  # params_ema, never the decoy params
        assert meta["converted_by"].startswith("upscale ") and meta["license"] == entry.license
        outputs[how] = out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [pth.name, outputs["given"].name, outputs["detected"].name]), "no temporary file left behind"

    image = tmp_path / f"{case}_x{scale}.png"
    result = cli(photo, "--weights", outputs["given"], "-m", name, "-s", scale, "-o", image)
    assert result.returncode == 0, result.stderr
    with Image.open(image) as im:
        assert im.size == (24 * scale, 24 * scale)


def test_every_family_has_golden_cases():
    need(GOLDEN)
    assert {f for f, _ in CASES} == {"agdn", "esc", "asid"}, "the ../shared/golden folder is incomplete"


@pytest.fixture
def asid_state():
    return load_golden("asid", "asid_x2").weights


def _corrupt_files(folder: Path, state: dict[str, torch.Tensor]) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the error must say)."""
    good = folder / "good.pth"
    torch.save(state, good)
    files = {}
    junk = folder / "junk.pth"
    junk.write_bytes(random.Random(7).randbytes(10_000))
    files["random bytes"] = (junk, "cannot read as a PyTorch checkpoint")
    cut = folder / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["truncated"] = (cut, "cannot read as a PyTorch checkpoint")
    empty = folder / "empty.pth"
    empty.write_bytes(b"")
    files["empty"] = (empty, "cannot read as a PyTorch checkpoint")
    tensor = folder / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    files["not a dict"] = (tensor, "not a state dict (a Tensor)")
    good.unlink()
    return files


@pytest.mark.parametrize("flags", [["-m", "asid", "-s", "2"], []], ids=["given", "detected"])
def test_corrupt_checkpoints_fail_in_one_line_and_write_nothing(flags, tmp_path, asid_state):
    for what, (path, needle) in _corrupt_files(tmp_path, asid_state).items():
        out = tmp_path / f"{path.stem}.safetensors"
        run = cli if what == "random bytes" else cli_in_process  # one real interpreter per flag set is enough
        result = run("convert", path, "-o", out, *flags)
        one_error_line(result, str(path), needle)
        assert not out.exists(), what
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".pth"], "no output, no temporary file"


@pytest.mark.parametrize("family,case", [("agdn", "agdn_x4"), ("esc", "esc_x2"), ("asid", "asid_x2")])
def test_wrong_shapes_fail_in_one_line_and_write_nothing(family, case, tmp_path, photo):
    require_family(family)
    golden = load_golden(family, case)
    name, scale = registry_name(golden.meta), int(golden.meta["scale"])
    state = dict(golden.weights)
    victim = next(k for k, v in state.items() if v.dim() == 4)  # a convolution (keys are sorted)
    bad_shape = (state[victim].shape[0] + 1, *state[victim].shape[1:])
    state[victim] = torch.zeros(bad_shape)
    pth = official_pth(family, state, tmp_path / "bad.pth")
    out = tmp_path / "bad.safetensors"

    result = cli("convert", pth, "-o", out, "-m", name, "-s", scale)
    one_error_line(result, str(pth), f"not {name} x{scale} weights", "wrong shape", victim)
    assert not out.exists()
    result = cli_in_process("convert", pth, "-o", out)
    one_error_line(result, str(pth))
    assert not out.exists()

    # the same mismatch in a .safetensors given to `upscale IMAGE --weights` fails before any output is written
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    image = tmp_path / "out.png"
    result = cli(photo, "--weights", out, "-m", name, "-s", scale, "-o", image)
    one_error_line(result, str(out), f"not {name} x{scale} weights", victim, code=2)  # a bad --weights: usage
    assert not image.exists()
