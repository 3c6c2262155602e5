"""Every frame of animated GIF, APNG and animated WebP files and every page of multi-page TIFFs: read as a viewer
shows them, upscaled one by one, and written as the same kind of file (durations, loop count, per-frame
transparency; a TIFF's page order and each page's own size, depth and metadata). Files are made here from pixels."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run
from PIL import Image, ImageCms

import upscale
from upscale.imageio import (
    ImageError,
    LoadedImage,
    TooLargeError,
    encode_image,
    read_image,
)

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # runs AGDN on the CPU
ANIMATED = ("GIF", "PNG", "WEBP")
DURATIONS = [40, 70, 120]


def photo_frames(n: int = 3, size=(32, 24), holes: bool = False) -> list[Image.Image]:
    """`n` different crops of the example photo (RGBA with a moving transparent hole when `holes`)."""
    with Image.open(REPO / "examples" / "cat.png") as im:
        photo = im.convert("RGB")
    frames = []
    for k in range(n):
        frame = Image.fromarray(np.asarray(photo.crop((8 * k, 4 * k, 8 * k + size[0], 4 * k + size[1]))))  # no ICC
        if holes:
            frame = frame.convert("RGBA")
            a = np.asarray(frame).copy()
            a[2 + 4 * k : 8 + 4 * k, 3:12, 3] = 0
            frame = Image.fromarray(a)
        frames.append(frame)
    return frames


def animation(kind: str, frames: list[Image.Image], loop: int | None = 0) -> bytes:
    buf = io.BytesIO()
    options = {"loop": loop} if loop is not None else {}
    if kind == "GIF" and frames[0].mode == "RGBA":
        options["disposal"] = 2
    frames[0].save(buf, kind, save_all=True, append_images=frames[1:], duration=DURATIONS[: len(frames)], **options)
    return buf.getvalue()


def opaque(frame: LoadedImage) -> np.ndarray:
    return frame.alpha < 0.5 if frame.alpha is not None else np.zeros(frame.rgb.shape[:2], bool)


@pytest.mark.parametrize("source", ANIMATED)
@pytest.mark.parametrize("target", ANIMATED)
@pytest.mark.parametrize("holes", [False, True], ids=["opaque", "transparent"])
def test_an_animation_round_trips_with_every_frame_its_duration_loop_and_transparency(source, target, holes):
    frames = photo_frames(holes=holes)
    image = read_image(animation(source, frames, loop=2))
    assert image.frames == 3 and [f.duration for f in image.all_frames] == DURATIONS and image.loop == 2
    assert [f.has_alpha for f in image.all_frames] == [holes] * 3
    back = read_image(encode_image(image, target))
    assert back.frames == 3 and [f.duration for f in back.all_frames] == DURATIONS and back.loop == 2
    for k, (a, b) in enumerate(zip(image.all_frames, back.all_frames)):
        assert b.size == a.size
        assert np.array_equal(opaque(a), opaque(b)), f"frame {k}: transparency moved"
        seen = ~opaque(a)
        error = np.abs(a.rgb - b.rgb)[seen].mean()
        # lossless APNG is exact; GIF re-quantises to 256 colours, WebP is lossy at quality 95
        assert error <= {"PNG": 0, "GIF": 0.02, "WEBP": 0.03}[target], (k, error)
    # the frames are distinct pictures in order (not the first one repeated)
    assert np.abs(back.all_frames[0].rgb - back.all_frames[1].rgb).mean() > 0.05


@pytest.mark.parametrize("target", ANIMATED)
def test_a_source_that_never_said_how_often_to_loop_plays_once(target):
    image = read_image(animation("GIF", photo_frames(), loop=None))
    assert image.loop is None
    back = read_image(encode_image(image, target))
    assert back.loop in ((None,) if target == "GIF" else (1,))


def sRGB() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def camera(make: str, exposure: tuple[int, int]) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = make  # Make
    exif.get_ifd(0x8769)[0x829A] = exposure  # ExposureTime, in the Exif sub-IFD
    return exif.tobytes()


def test_a_multipage_tiff_keeps_page_order_and_each_pages_size_depth_mode_and_metadata():
    rng = np.random.default_rng(3)
    pages = [
        LoadedImage(rgb=rng.random((20, 30, 3), np.float32), exif=camera("Scanner A", (1, 60)), icc_profile=sRGB()),
        LoadedImage(rgb=np.repeat(rng.random((25, 31, 1), np.float32), 3, 2), grayscale=True, bit_depth=16,
                    exif=camera("Scanner B", (1, 125))),
        LoadedImage(rgb=rng.random((10, 12, 3), np.float32), alpha=rng.random((10, 12), np.float32), bit_depth=16,
                    xmp=b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-'
                        b'syntax-ns#"><rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" dc:format="page 3"/>'
                        b'</rdf:RDF></x:xmpmeta>'),
    ]
    document = pages[0]
    document.pages = pages[1:]
    data = encode_image(document, "TIFF", provenance={"model": "agdn", "scale": 2})
    back = read_image(data)
    assert back.frames == 3
    for k, (a, b) in enumerate(zip(pages, back.all_frames)):
        assert (b.size, b.bit_depth, b.grayscale, b.has_alpha) == (a.size, a.bit_depth, a.grayscale, a.has_alpha), k
        assert np.abs(a.rgb - b.rgb).max() <= (0.5 / 255 if a.bit_depth == 8 else 0.5 / 65535) + 1e-6, k
        assert (b.icc_profile is not None) == (a.icc_profile is not None), k
        assert (b.xmp is not None and b"page 3" in b.xmp) == (k == 2), k
        exif = Image.Exif()
        if b.exif:
            exif.load(b.exif)
        if a.exif:
            source = Image.Exif()
            source.load(a.exif)
            assert exif.get(0x010F) == source.get(0x010F), k
            assert exif.get_ifd(0x8769).get(0x829A) == source.get_ifd(0x8769).get(0x829A), k
    # another reader agrees on the pages (libtiff, through imagecodecs)
    import imagecodecs

    assert [imagecodecs.tiff_decode(data, k).shape[:2] for k in range(3)] == [(20, 30), (25, 31), (10, 12)]


def test_pages_read_by_pillow_keep_their_own_profile_not_the_last_page_read():
    pages = photo_frames(3)
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])  # no profile anywhere...
    plain = read_image(buf.getvalue())
    assert [f.icc_profile for f in plain.all_frames] == [None] * 3
    tagged = LoadedImage(rgb=plain.rgb, pages=[plain.pages[0], LoadedImage(rgb=plain.pages[1].rgb, icc_profile=sRGB())])
    back = read_image(encode_image(tagged, "TIFF"))  # ... then only on the last page
    assert [f.icc_profile is not None for f in back.all_frames] == [False, False, True]


def test_all_frames_count_against_the_pixel_limit():
    data = animation("GIF", photo_frames(3))
    upscale.imageio.set_max_pixels(32 * 24 * 3 - 1)
    try:
        with pytest.raises(TooLargeError, match="3 frames of 32x24"):
            read_image(data, name="anim.gif")
        assert read_image(data, name="anim.gif", allow_large=True).frames == 3
    finally:
        upscale.imageio.set_max_pixels(None)


def test_a_tiff_whose_later_pages_are_larger_counts_them_all_against_the_limit():
    small, large = Image.new("RGB", (8, 8)), Image.new("RGB", (64, 64))
    buf = io.BytesIO()
    small.save(buf, "TIFF", save_all=True, append_images=[large, large])
    upscale.imageio.set_max_pixels(64 * 64 * 2)  # each page fits, the three together do not
    try:
        with pytest.raises(TooLargeError, match="scan.tif: 3 pages hold more than the 8,192-pixel safety limit"):
            read_image(buf.getvalue(), name="scan.tif")
    finally:
        upscale.imageio.set_max_pixels(None)


def test_a_format_of_one_image_refuses_several_frames_in_one_line():
    image = read_image(animation("PNG", photo_frames()))
    with pytest.raises(ImageError, match="JPEG holds one image and this one has 3 frames"):
        encode_image(image, "JPEG", name="out.jpg")


@pytest.fixture(scope="module")
def agdn2():
    return upscale.load_model("agdn", 2)


@pytest.mark.parametrize("source", ANIMATED)
def test_the_api_upscales_every_frame_as_it_would_each_alone(agdn2, source):
    image = read_image(animation(source, photo_frames(holes=True)))
    seen = []
    result = upscale.api.upscale_image_with_stats(agdn2, image, on_frame=lambda done, n: seen.append((done, n)))[0]
    assert result.frames == 3 and seen == [(1, 3), (2, 3), (3, 3)]
    for frame, done in zip(image.all_frames, result.all_frames):
        alone = upscale.upscale_image(agdn2, LoadedImage(rgb=frame.rgb, alpha=frame.alpha))
        assert np.array_equal(done.rgb, alone.rgb) and np.array_equal(done.alpha, alone.alpha)
        assert done.duration == frame.duration and done.size == (2 * frame.size[0], 2 * frame.size[1])


def test_the_command_line_writes_every_frame_as_the_same_kind_of_file(tmp_path):
    frames = photo_frames(holes=True)
    (tmp_path / "anim.gif").write_bytes(animation("GIF", frames, loop=0))
    (tmp_path / "anim.png").write_bytes(animation("PNG", frames, loop=3))
    (tmp_path / "web.webp").write_bytes(animation("WEBP", frames, loop=0))
    frames[0].save(tmp_path / "scan.tif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "still.gif")
    frames[0].convert("RGB").save(tmp_path / "phone.jpg", "MPO", save_all=True,  # a preview image: not a frame
                                  append_images=[frames[1].convert("RGB")])
    names = ("anim.gif", "anim.png", "web.webp", "scan.tif", "still.gif", "phone.jpg")
    result = run(*(tmp_path / n for n in names), "-s", "2", "-o", tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    records = {Path(r["input"]).name: r for r in map(json.loads, result.stdout.splitlines()[:-1])}
    # a GIF stays a GIF and a TIFF a TIFF; the rest default to PNG (an APNG here)
    outputs = {name: Path(records[name]["output"]).name for name in names}
    assert outputs == {"anim.gif": "anim_x2.gif", "anim.png": "anim_x2.png", "web.webp": "web_x2.png",
                       "scan.tif": "scan_x2.tif", "still.gif": "still_x2.gif", "phone.jpg": "phone_x2.png"}
    assert {n: records[n]["frames"] for n in names} == {"anim.gif": 3, "anim.png": 3, "web.webp": 3, "scan.tif": 3,
                                                          "still.gif": 1, "phone.jpg": 1}
    assert not any("warnings" in r for r in records.values()) and "warning" not in result.stderr
    for name, loop in (("anim_x2.gif", 0), ("anim_x2.png", 3)):
        out = read_image(tmp_path / "out" / name)
        assert out.frames == 3 and out.loop == loop and [f.duration for f in out.all_frames] == DURATIONS
        assert all(f.size == (64, 48) and f.has_alpha for f in out.all_frames)
    scan = read_image(tmp_path / "out" / "scan_x2.tif")
    assert scan.frames == 3 and all(f.size == (64, 48) for f in scan.all_frames)
    # the pages in order: each output page is closest to its own source page, enlarged
    for k, page in enumerate(scan.all_frames):
        small = np.asarray(Image.fromarray((page.rgb * 255).round().astype(np.uint8)).resize((32, 24)), np.float32)
        distances = [np.abs(small / 255 - np.asarray(f.convert("RGB"), np.float32) / 255).mean() for f in frames]
        assert int(np.argmin(distances)) == k


def test_a_format_of_one_image_gets_the_first_frame_and_says_so(tmp_path):
    (tmp_path / "anim.gif").write_bytes(animation("GIF", photo_frames()))
    result = run(tmp_path / "anim.gif", "-s", "2", "-o", tmp_path / "first.jpg", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.splitlines()[0])
    assert record["frames"] == 1
    assert record["warnings"] == ["JPEG holds one image: upscaled the first of 3 frames (write gif, png, webp or tif "
                                  "to keep them all)"]
    assert "warning: " in result.stderr and read_image(tmp_path / "first.jpg").size == (64, 48)


def test_a_broken_later_frame_fails_that_file_in_one_line_and_the_batch_goes_on(tmp_path):
    data = animation("GIF", photo_frames())
    (tmp_path / "cut.gif").write_bytes(data[: len(data) * 3 // 4])  # the last frames cut off
    (tmp_path / "good.gif").write_bytes(data)
    result = run(tmp_path / "cut.gif", tmp_path / "good.gif", "-s", "2", "-o", tmp_path / "out")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cut.gif" in errors[0], result.stderr
    assert (tmp_path / "out" / "good_x2.gif").exists() and not (tmp_path / "out" / "cut_x2.gif").exists()


def test_an_avif_sequence_is_read_whole_and_becomes_an_apng_by_default(tmp_path):
    frames = photo_frames()
    buf = io.BytesIO()
    frames[0].save(buf, "AVIF", save_all=True, append_images=frames[1:], duration=DURATIONS, quality=90)
    image = read_image(buf.getvalue())
    assert image.frames == 3 and [f.duration for f in image.all_frames] == DURATIONS
    (tmp_path / "seq.avif").write_bytes(buf.getvalue())
    result = run(tmp_path / "seq.avif", "-s", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["frames"] == 3
    assert read_image(tmp_path / "seq_x2.png").frames == 3


def test_frames_that_would_not_fit_in_memory_fail_that_file_in_one_line(tmp_path, monkeypatch, agdn2):
    from upscale import batch, memory

    image = read_image(animation("GIF", photo_frames()))
    stages = batch.UpscaleStages(agdn2)
    job = batch.Job(Path("anim.gif"), tmp_path / "anim_x2.gif")
    need = 3 * 32 * 24 * 12 * 4  # 3 frames, 12 bytes a pixel (RGB float32), x2
    monkeypatch.setattr(memory, "available_ram", lambda: 2 * need - 2)
    with pytest.raises(ImageError, match=r"^anim.gif: its 3 frames at x2 need 0.0 GB held at once, more than half"):
        stages.compute(job, image)
    monkeypatch.setattr(memory, "available_ram", lambda: 2 * need)
    result, used = stages.compute(job, image)
    assert used["frames"] == 3
