"""The command line for real work: folders, globs, lists, stdin/stdout, JSON, exit codes, interruptions.

Every test runs the real console script in a subprocess on tiny crops of the example photographs, at x2 to
stay fast. Each run imports torch (seconds on a loaded machine), so one run checks several behaviours.
"""

from __future__ import annotations

import json
import shlex
import signal
import struct
import subprocess
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from conftest import REPO, interrupt_once_written, run, upscale_cmd
from PIL import Image, ImageOps

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # runs AGDN on the CPU

CAT = REPO / "examples" / "cat.png"
COFFEE = REPO / "examples" / "coffee.png"
RECORD_KEYS = {"input", "output", "status", "error", "model", "scale", "device", "precision", "seconds"}
ANSI = "\x1b"


def crop(source: Path, box: tuple[int, int, int, int], dest: Path, **save) -> Path:
    """A small crop of a real photograph, saved at `dest` (format from the extension)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as im:
        im.convert("RGB").crop(box).save(dest, **save)
    return dest


def truncated(source: Path, dest: Path) -> Path:
    data = source.read_bytes()
    dest.write_bytes(data[: len(data) // 2])
    return dest


def size_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def decodes(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def json_lines(stdout: str) -> tuple[list[dict], dict]:
    """Every stdout line is a JSON object: per-input records, then one summary."""
    objects = [json.loads(line) for line in stdout.splitlines()]
    assert objects and objects[-1].get("summary") is True, stdout
    assert not any(o.get("summary") for o in objects[:-1])
    return objects[:-1], objects[-1]


def error_lines(stderr: str) -> list[str]:
    lines = stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines), stderr
    return lines


def no_noise(stderr: str) -> None:
    """stderr is a pipe here: no progress bar, no colour codes, no traceback."""
    assert ANSI not in stderr and "\r" not in stderr and "Traceback" not in stderr, stderr


def all_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def shots(tmp_path) -> Path:
    """A camera folder: three images (one in a sub-folder), junk that is not an image, and broken images."""
    root = tmp_path / "shots"
    crop(CAT, (40, 20, 60, 44), root / "a.png")
    crop(COFFEE, (60, 40, 80, 64), root / "b.jpg", quality=92)
    crop(CAT, (90, 50, 110, 74), root / "sub" / "c.png")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1\x00\x00\x10\x00")
    (root / "Thumbs.db").write_bytes(bytes.fromhex("d0cf11e0a1b11ae1") + b"\x00" * 56)
    (root / "notes.txt").write_text("holiday pictures\n")
    (root / "readme.png").write_text("a text file wearing an image extension\n")
    (root / "empty.png").write_bytes(b"")
    truncated(root / "a.png", root / "cut.png")
    return root


def test_folder_recursive_json_skips_junk_fails_broken_images_and_goes_on(shots, tmp_path):
    out = tmp_path / "big"
    result = run(shots, "-o", out, "-r", "-s", "2", "--json")
    assert result.returncode == 1, result.stderr  # some inputs failed, the rest were done
    records, summary = json_lines(result.stdout)
    by_name = {Path(r["input"]).name: r for r in records}
    for r in records:
        assert RECORD_KEYS <= r.keys(), r
        assert r["status"] in ("ok", "skipped", "failed")
        assert (r["model"], r["scale"], r["device"], r["precision"]) == ("agdn", 2, "cpu", "fp32")
        assert isinstance(r["seconds"], (int, float))
        if r["status"] == "ok":  # what the engine did: protocol, tile, tiles per forward call, fallbacks
            assert r["protocol"] == "reference" and r["tiles_per_forward"] == 1 and r["fp32_fallbacks"] == 0
    assert {n for n, r in by_name.items() if r["status"] == "ok"} == {"a.png", "b.jpg", "c.png"}
    junk = {".DS_Store", "Thumbs.db", "notes.txt", "readme.png"}
    assert {n for n, r in by_name.items() if r["status"] == "skipped"} == junk
    assert all(by_name[n]["error"] == "not an image" for n in junk)
    assert {n for n, r in by_name.items() if r["status"] == "failed"} == {"empty.png", "cut.png"}
    assert by_name["a.png"]["error"] is None and by_name["a.png"]["output"] == str(out / "a_x2.png")
    assert (summary["ok"], summary["skipped"], summary["failed"], summary["not_images"]) == (3, 0, 2, 4)
    assert summary["interrupted"] is False and summary["not_started"] == 0

    # one line per broken file, naming it; nothing else on stderr with --json
    errors = error_lines(result.stderr)
    assert len(errors) == 2
    assert str(shots / "cut.png") in errors[0] and "truncated" in errors[0]  # inputs go in sorted order
    assert str(shots / "empty.png") in errors[1] and "empty" in errors[1]
    no_noise(result.stderr)

    # sub-folders mirrored under -o, formats kept, nothing else written (no partial, no failed output)
    assert all_files(out) == {"a_x2.png", "b_x2.png", "sub/c_x2.png"}
    assert size_of(out / "a_x2.png") == (40, 48) and size_of(out / "sub" / "c_x2.png") == (40, 48)
    with Image.open(out / "b_x2.png") as im:  # lossless PNG by default, whatever the input format
        assert im.format == "PNG" and im.size == (40, 48)

    # a second run skips what is done (the default for folders) and leaves it untouched
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = run(shots, "-o", out, "-r", "-s", "2", "--json")
    assert again.returncode == 1
    records, summary = json_lines(again.stdout)
    assert (summary["ok"], summary["skipped"], summary["failed"]) == (0, 3, 2)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


def test_dry_run_prints_the_plan_writes_nothing_and_loads_no_model(shots, tmp_path):
    out = tmp_path / "big"
    missing = tmp_path / "missing.safetensors"  # a run that loaded a model would fail on it
    result = run(shots, "-o", out, "-m", "agdn", "-s", "2", "--weights", missing, "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"{shots / 'a.png'} -> {out / 'a_x2.png'} (new)" in lines
    assert f"{shots / 'b.jpg'} -> {out / 'b_x2.png'} (new)" in lines
    assert f"{shots / 'readme.png'}: not an image, skipped" in lines
    assert not any("c.png" in line for line in lines)  # not recursive: the sub-folder is left alone
    assert not out.exists() and result.stderr == ""

    real = run(shots, "-o", out, "-m", "agdn", "-s", "2", "--weights", missing)
    assert real.returncode not in (0, 130) and str(missing) in real.stderr
    assert not out.exists() or all_files(out) == set()


def test_glob_list_file_format_and_quality(tmp_path):
    src = tmp_path / "g"
    crop(CAT, (40, 20, 60, 44), src / "one.png")
    crop(COFFEE, (60, 40, 80, 64), src / "two.png")
    crop(CAT, (0, 0, 20, 24), src / "three.bmp")
    crop(COFFEE, (100, 50, 120, 74), tmp_path / "elsewhere" / "four.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# images to do\n\n{tmp_path / 'elsewhere' / 'four.png'}\n")
    out = tmp_path / "out"
    # the glob is quoted: the program expands it, and only the PNGs match
    result = run(str(src / "*.png"), "--from-list", listing, "-o", out, "-s", "2", "--format", "jpeg",
                 "--quality", "80", "--suffix", "_big", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert all_files(out) == {"one_big.jpg", "two_big.jpg", "four_big.jpg"}
    for name in ("one_big.jpg", "four_big.jpg"):
        with Image.open(out / name) as im:
            assert im.format == "JPEG" and im.size == (40, 48)
    # quality 80 is smaller than the default 95
    default = run(src / "one.png", "-o", out / "one_q95.jpg", "-s", "2", "--quiet")
    assert default.returncode == 0, default.stderr
    assert (out / "one_big.jpg").stat().st_size < (out / "one_q95.jpg").stat().st_size


def test_pipelines_find_into_from_list_and_stdin_to_stdout(tmp_path):
    src = tmp_path / "pics"
    a = crop(CAT, (40, 20, 60, 44), src / "a.png")
    crop(COFFEE, (60, 40, 80, 64), src / "deep" / "b.png")
    cmd = " ".join(shlex.quote(c) for c in upscale_cmd())

    found = subprocess.run(["bash", "-c", f"find {shlex.quote(str(src))} -name '*.png' | {cmd} --from-list - "
                                          f"-s 2 --json"], capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    records, summary = json_lines(found.stdout)
    assert sorted(Path(r["output"]).name for r in records) == ["a_x2.png", "b_x2.png"]
    assert all(r["status"] == "ok" for r in records) and summary["ok"] == 2
    assert size_of(src / "deep" / "b_x2.png") == (40, 48)  # written beside each input
    assert found.stderr == ""

    b = tmp_path / "b.png"
    piped = subprocess.run(["bash", "-c", f"cat {shlex.quote(str(a))} | {cmd} - -o - > {shlex.quote(str(b))}"],
                           capture_output=True, text=True)
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == ""  # a successful single image to stdout says nothing
    with Image.open(b) as im:
        im.load()
        assert im.format == "PNG" and im.size == (80, 96)  # the default model: x4
        assert im.text["upscale:model"] == "agdn" and im.text["upscale:scale"] == "4"


def _png_header(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR."""
    data = path.read_bytes()
    assert data[12:16] == b"IHDR"
    w, h, depth, colour = struct.unpack(">IIBB", data[16:26])
    return w, h, depth, colour


def test_fidelity_through_a_folder_16bit_rgba_exif_orientation_icc(tmp_path):
    src = tmp_path / "fid"
    src.mkdir()
    rng = np.random.default_rng(0)
    with Image.open(CAT) as im:
        rgb = np.asarray(im.convert("RGB").crop((40, 20, 60, 44)), dtype=np.uint16) * 257
        icc = im.info["icc_profile"]
    rgb = rgb + rng.integers(0, 200, rgb.shape, dtype=np.uint16)  # real 16-bit values, not 8-bit * 257
    alpha = np.linspace(20000, 65535, 24 * 20).reshape(24, 20, 1).astype(np.uint16)
    (src / "deep.png").write_bytes(imagecodecs.png_encode(np.concatenate([rgb, alpha], axis=2)))

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 20 x 24, displayed rotated 90 degrees clockwise: 24 x 20
    exif[0x010F] = "CameraMaker"
    crop(COFFEE, (60, 40, 80, 64), src / "turned.jpg", quality=95, exif=exif.tobytes(), icc_profile=icc)

    out = tmp_path / "out"
    result = run(src, "-o", out, "-s", "2", "--json")
    assert result.returncode == 0, result.stderr
    records, summary = json_lines(result.stdout)
    assert summary["ok"] == 2

    # 16-bit RGBA in, 16-bit RGBA out, with the provenance in PNG text
    assert _png_header(out / "deep_x2.png") == (40, 48, 16, 6)
    pixels = imagecodecs.png_decode((out / "deep_x2.png").read_bytes())
    assert pixels.dtype == np.uint16 and pixels.shape == (48, 40, 4)
    assert np.any(pixels[..., :3] % 257 != 0)  # 16-bit precision kept
    assert abs(float(pixels[..., 3].mean()) - float(alpha.mean())) < 1000
    with Image.open(out / "deep_x2.png") as im:
        assert im.text["upscale:model"] == "agdn" and im.text["upscale:scale"] == "2"

    # EXIF orientation applied to the pixels (dimensions swapped), ICC and EXIF carried over
    with Image.open(out / "turned_x2.png") as im:
        assert im.size == (48, 40)
        assert im.info.get("icc_profile") == icc
        out_exif = im.getexif()
        assert out_exif.get(0x0112, 1) == 1 and out_exif.get(0x010F) == "CameraMaker"
        sr = np.asarray(im.convert("RGB").resize((24, 20), Image.BICUBIC), dtype=np.float64)
    with Image.open(src / "turned.jpg") as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.float64)
    assert np.abs(sr - upright).mean() < 8.0  # the same picture, turned the right way


def test_stdout_holds_only_data_and_quiet_is_silent(tmp_path):
    a = crop(CAT, (40, 20, 60, 44), tmp_path / "a.png")
    b = crop(COFFEE, (60, 40, 80, 64), tmp_path / "b.png")
    out = tmp_path / "out"
    result = run(a, b, "-o", out, "-s", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3 and "2 upscaled" in lines[-1]  # one line per image, then the summary
    assert all(str(p) in line for p, line in zip((a, b), lines))
    no_noise(result.stderr)

    (out / "a_x2.png").write_bytes(b"stale")
    quiet = run(a, b, "-o", out, "-s", "2", "--quiet", "--overwrite")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and quiet.stderr == ""
    assert decodes(out / "a_x2.png") and size_of(out / "a_x2.png") == (40, 48)  # --overwrite replaced it
    assert all_files(out) == {"a_x2.png", "b_x2.png"}


@pytest.mark.parametrize("args, needle", [
    (["a.png", "b.png", "-o", "-"], "exactly one input"),
    (["a.png", "--overwrite", "--skip-existing"], "contradict"),
    (["a.png", "-m", "no-such-model"], "unknown model"),
    (["a.png", "-o", "-", "--json"], "stdout"),
    (["--from-list", "missing.txt"], "missing.txt"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, args, needle):
    crop(CAT, (40, 20, 60, 44), tmp_path / "a.png")
    crop(COFFEE, (60, 40, 80, 64), tmp_path / "b.png")
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert {p.name for p in tmp_path.iterdir()} == {"a.png", "b.png"}


def test_exit_codes_are_documented():
    for args in (["--help"], ["run", "--help"]):
        result = run(*args)
        assert result.returncode == 0
        text = " ".join(result.stdout.split())
        for code in ("0 all done", "1 some inputs failed", "2 usage error", "130 interrupted"):
            assert code in text, (args, result.stdout)


def test_an_input_is_never_overwritten(tmp_path):
    folder = tmp_path / "pics"
    a = crop(CAT, (40, 20, 60, 44), folder / "a.png")
    b = crop(COFFEE, (60, 40, 80, 64), folder / "b.png")
    before = {p: p.read_bytes() for p in (a, b)}
    for extra in ([], ["--overwrite"]):
        result = run(folder, "-o", folder, "--suffix", "", "-s", "2", *extra)
        assert result.returncode == 1, (extra, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 2 and all("refusing to write over the input image" in e for e in errors)
        assert {p: p.read_bytes() for p in (a, b)} == before
        assert {p.name for p in folder.iterdir()} == {"a.png", "b.png"}


def test_broken_inputs_and_an_unwritable_output_fail_one_line_each_and_the_batch_goes_on(tmp_path):
    good = crop(CAT, (40, 20, 60, 44), tmp_path / "good.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    cut = truncated(good, tmp_path / "cut.png")
    out = tmp_path / "out"
    result = run(empty, cut, good, "-o", out, "-s", "2")
    assert result.returncode == 1
    errors = error_lines("\n".join(l for l in result.stderr.splitlines() if l.startswith("error: ")))
    assert len(errors) == 2 and str(empty) in errors[0] and str(cut) in errors[1]
    assert all_files(out) == {"good_x2.png"} and decodes(out / "good_x2.png")

    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file where a folder should be")
    other = crop(COFFEE, (60, 40, 80, 64), tmp_path / "other.png")
    result = run(good, other, "-o", blocker / "out", "-s", "2", "--json")
    assert result.returncode == 1
    records, summary = json_lines(result.stdout)
    assert summary["failed"] == 2 and [r["status"] for r in records] == ["failed", "failed"]
    errors = error_lines(result.stderr)
    assert len(errors) == 2
    assert str(blocker / "out" / "good_x2.png") in errors[0] and str(blocker / "out" / "other_x2.png") in errors[1]
    assert blocker.read_text().startswith("a regular file")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_mid_batch_leaves_only_complete_files(tmp_path, signum):
    folder = tmp_path / "many"
    for i in range(6):  # large enough (about 0.3 s each) that the batch is still running when signalled
        crop(CAT if i % 2 else COFFEE, (i * 10, 0, i * 10 + 96, 96), folder / f"{i}.png")
    out = tmp_path / "out"
    ended = interrupt_once_written([folder, "-o", out, "-s", "2"], out, signum)
    stdout, stderr = ended.stdout, ended.stderr
    assert ended.returncode == 130, stderr
    assert stdout == ""
    names = {p.name for p in out.iterdir()}
    assert names and not any(n.startswith(".") or n.endswith(".part") for n in names), names
    assert len(names) < 6, "the batch ended before the signal"
    for p in out.iterdir():
        assert decodes(p) and size_of(p) == (192, 192), p
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted:") and f"{len(names)} done" in last and "not started" in last, stderr
    assert "Traceback" not in stderr
