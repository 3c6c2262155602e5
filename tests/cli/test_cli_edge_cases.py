"""The command line off the happy path: colliding outputs, names it cannot write, odd file names, closed pipes,
empty folders, half precision on the CPU, one error prefix. Each through the real console script."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, photo_crop, run, upscale_cmd
from PIL import Image

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # runs AGDN on the CPU

CAT = REPO / "examples" / "cat.png"


def records(stdout: str) -> tuple[list[dict], dict]:
    objects = [json.loads(line) for line in stdout.splitlines()]
    return objects[:-1], objects[-1]


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_inputs_sharing_an_output_all_fail_naming_each_other_and_the_rest_runs(tmp_path):
    folder = tmp_path / "d"
    photo_crop(folder / "a.png")
    photo_crop(folder / "a.jpg", quality=95)
    photo_crop(folder / "b.png", box=(30, 30, 54, 54))
    out = tmp_path / "out"
    for flags in ([], ["--overwrite"]):
        result = run(folder, "-o", out, "-s", "2", "--json", *flags)
        assert result.returncode == 1, result.stderr
        lines = errors(result.stderr)
        assert len(lines) == 2 and all("a.png" in line and "a.jpg" in line and "a_x2.png" in line for line in lines)
        assert sorted(p.name for p in out.iterdir()) == ["b_x2.png"]  # nothing lost, nothing half-kept
        recs, summary = records(result.stdout)
        by_name = {Path(r["input"]).name: r for r in recs}
        assert by_name["a.png"]["status"] == by_name["a.jpg"]["status"] == "failed"
        assert by_name["b.png"]["status"] in ("ok", "skipped")
        assert summary["failed"] == 2
    # names that differ only in case collide too: the output folder may be case-insensitive (macOS, exFAT)
    upper = photo_crop(tmp_path / "n" / "A.png")
    lower = photo_crop(tmp_path / "n" / "a.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{upper}\n{lower}\n{lower}\n")
    result = run("--from-list", listing, "-o", tmp_path / "out2", "-s", "2", "--json")
    assert result.returncode == 1 and len(errors(result.stderr)) == 2, result.stderr
    recs, summary = records(result.stdout)
    assert [r["status"] for r in recs] == ["failed", "failed", "skipped"]  # the repeated input is done once
    assert "given again" in recs[2]["error"]
    assert not (tmp_path / "out2").exists()


def test_output_name_decides_the_format_and_an_unwritable_one_is_a_usage_error(tmp_path):
    src = photo_crop(tmp_path / "p.png")
    pcx = run(src, "-s", "2", "-o", tmp_path / "big.pcx")
    assert pcx.returncode == 2 and not (tmp_path / "big.pcx").exists()
    assert len(errors(pcx.stderr)) == 1 and ".pcx" in pcx.stderr and ".webp" in pcx.stderr
    clash = run(src, "-s", "2", "-o", tmp_path / "big.jpg", "--format", "png")
    assert clash.returncode == 2 and not (tmp_path / "big.jpg").exists() and "JPEG" in clash.stderr
    for name, magic in (("big.WEBP", b"RIFF"), ("big.tiff", b"II*\x00"), ("big.gif", b"GIF8"), ("out.img", b"\x89PNG")):
        flags = ["--format", "png"] if name == "out.img" else []
        result = run(src, "-s", "2", "-o", tmp_path / name, *flags)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / name).read_bytes()[:4] == magic, name


def test_control_characters_in_names_stay_on_one_line(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    good = photo_crop(tmp_path / "x.png").read_bytes()
    (folder / "bad\nname.png").write_bytes(good[: len(good) // 2])  # truncated
    (folder / "esc\x1bape.png").write_bytes(good[:40])
    result = run(folder, "-s", "2", "--json")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr  # one whole line per failed input (JSON: no summary line)
    assert any("bad\\nname.png" in line and "truncated" in line.lower() for line in lines), result.stderr
    assert any("esc\\x1bape.png" in line for line in lines) and "\x1b" not in result.stderr
    recs, _ = records(result.stdout)
    assert {r["input"] for r in recs} == {str(folder / "bad\nname.png"), str(folder / "esc\x1bape.png")}
    assert all("\n" not in r["error"] and "\x1b" not in r["error"] for r in recs)


def test_one_error_prefix_and_one_exit_code_per_kind_of_problem(tmp_path):
    src = photo_crop(tmp_path / "p.png")
    unknown = run(src, "--no-such-flag")
    assert unknown.returncode == 2 and unknown.stderr.strip().splitlines() == errors(unknown.stderr)
    assert len(errors(unknown.stderr)) == 1
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"not weights at all")
    for flags in ([], ["-m", "agdn", "-s", "2"]):  # detected or named: the same kind of problem, the same code
        result = run(src, "--weights", bad, *flags, "-o", tmp_path / "o.png")
        assert result.returncode == 2 and len(errors(result.stderr)) == 1, result.stderr
        assert "Error:" not in result.stderr
    missing = run("convert", tmp_path / "none.pth")
    assert missing.returncode == 1 and errors(missing.stderr) == [missing.stderr.strip()]


def test_a_closed_stdout_is_an_error_not_a_silent_cut(tmp_path):
    # a 2 MB BMP: more than a pipe holds, so the reader leaving early cuts the write short
    src = tmp_path / "b.png"
    with Image.open(CAT) as im:
        im.convert("RGB").resize((400, 400)).save(src)
    proc = subprocess.Popen([*upscale_cmd(), str(src), "-s", "2", "-o", "-", "--format", "bmp"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(proc.stdout.read(100)) == 100
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 1
    assert len(stderr.strip().splitlines()) == 1 and "broken pipe" in stderr.lower(), stderr
    assert "Exception ignored" not in stderr and "Traceback" not in stderr


def test_half_precision_on_the_cpu_is_said_to_be_slow(tmp_path):
    assert "slower" in run("--help").stdout + run("run", "--help").stdout
    result = run(photo_crop(tmp_path / "p.png", box=(0, 0, 16, 16)), "-s", "2", "--precision", "bf16",
                 "--device", "cpu", "-o", tmp_path / "o.png")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "slower" in warnings[0]


@pytest.mark.parametrize("recursive", [False, True])
def test_a_folder_without_images_says_so_and_exits_1(tmp_path, recursive):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no pictures here")
    result = run(empty, "-s", "2", *(["-r"] if recursive else []))
    assert result.returncode == 1
    assert errors(result.stderr) == [f"error: no images found in {empty}"
                                     + (" or its sub-folders" if recursive else "")]


def test_earlier_results_in_a_folder_are_counted_as_skipped_with_the_reason(tmp_path):
    folder = tmp_path / "shots"
    photo_crop(folder / "img.png")
    photo_crop(folder / "img_x2.png", box=(0, 0, 48, 48))  # the user's own file, or an earlier result
    photo_crop(folder / "new.png", box=(10, 10, 34, 34))
    result = run(folder, "-s", "2", "--json")
    assert result.returncode == 0, result.stderr
    recs, summary = records(result.stdout)
    by_name = {Path(r["input"]).name: r for r in recs}
    assert set(by_name) == {"img.png", "img_x2.png", "new.png"}
    assert by_name["img_x2.png"]["status"] == "skipped" and "img.png" in by_name["img_x2.png"]["error"]
    assert by_name["img.png"]["status"] == "skipped" and by_name["new.png"]["status"] == "ok"
    assert summary["ok"] + summary["skipped"] + summary["failed"] == summary["total"] == 3
    # and a folder holding only done work is not an error
    again = run(folder, "-s", "2")
    assert again.returncode == 0 and "0 upscaled, 4 skipped" in again.stderr, again.stderr
