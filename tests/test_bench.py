"""`upscale.bench`: the benchmark runs and reports sane fields. No timing assertions here: timing belongs in
`upscale bench` on a quiet machine, not in a unit test (the fast path's speed is reported, its correctness is
tested in test_agdn.py)."""

import io
import json

import pytest
from rich.console import Console

from upscale import bench
from upscale.bench import MachineBusyError, format_table, parse_size, run_bench

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # runs AGDN on the CPU


@pytest.fixture(scope="module")
def tiny_results():
    # force: the test machine may be busy; timings are not asserted
    return run_bench("agdn", 4, sizes=[(32, 32), "20x36"], repeats=2, warmup=1, threads=1, weights="random",
                     folder_images=2, force=True)


def test_bench_reports_fast_and_straight_rows_per_size(tiny_results):
    latency = [r for r in tiny_results if r["kind"] == "latency"]
    assert [(tuple(r["size"]), r["impl"]) for r in latency] == [
        ((32, 32), "fast"), ((32, 32), "straight"), ((20, 36), "fast"), ((20, 36), "straight")]
    for r in latency:
        lat = r["latency_s"]
        assert 0 < lat["min"] <= lat["q1"] <= lat["median"] <= lat["q3"] <= lat["max"]
        assert len(r["times_s"]) == 2 and r["repeats"] == 2 and r["threads"] == 1
        assert r["output_size"] == [r["size"][0] * 4, r["size"][1] * 4]
        out_mpix = r["output_size"][0] * r["output_size"][1] / 1e6
        assert r["mpix_per_s"]["median"] == pytest.approx(out_mpix / lat["median"])
        assert r["peak_memory_mb"] > 0 and "whole process" in r["memory_kind"]
        assert r["speedup_vs_straight"] > 0
        assert (r["model"], r["scale"], r["device"], r["precision"]) == ("agdn", 4, "cpu", "fp32")
    fast, straight = latency[0], latency[1]
    assert fast["speedup_vs_straight"] == pytest.approx(straight["latency_s"]["median"] / fast["latency_s"]["median"])


def test_bench_times_a_folder_end_to_end_sequential_and_overlapped(tiny_results):
    folders = [r for r in tiny_results if r["kind"] == "folder"]
    assert [r["mode"] for r in folders] == ["sequential", "overlapped"]
    for folder in folders:
        assert folder["images"] == folder["written"] == 2 and folder["size"] == [32, 32]
        assert len(folder["totals_s"]) == folder["rounds"]
        assert min(folder["totals_s"]) <= folder["seconds_total"] <= max(folder["totals_s"])
        assert folder["seconds_per_image"] == pytest.approx(folder["seconds_total"] / 2)
        assert folder["mpix_per_s"] == pytest.approx(2 * 128 * 128 / 1e6 / folder["seconds_total"])


def test_bench_results_are_json_and_render_as_a_table(tiny_results):
    assert json.loads(json.dumps(tiny_results)) == tiny_results
    buffer = io.StringIO()
    format_table(tiny_results, Console(file=buffer, width=160))
    text = buffer.getvalue()
    for word in ("agdn x4", "32x32", "fast", "straight", "folder", "sequential", "overlapped", "speed-up", "MP/s"):
        assert word in text


def test_bench_refuses_a_busy_machine(monkeypatch, capsys):
    monkeypatch.setattr(bench, "cpu_busy", lambda interval=0.5: {"others": 0.9, "load_per_core": 1.5})
    with pytest.raises(MachineBusyError, match="busy"):
        run_bench("agdn", 4, sizes=[(16, 16)], repeats=1, weights="random")
    results = run_bench("agdn", 4, sizes=[(16, 16)], repeats=1, threads=1, weights="random", folder_images=0,
                        reference_impl=False, force=True)
    assert [r["impl"] for r in results] == ["fast"] and all(r["busy"] for r in results)
    assert "WARNING" in capsys.readouterr().err


def test_bench_pins_threads_and_restores_them():
    import torch

    before = torch.get_num_threads()
    with bench._threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_parse_size():
    assert parse_size("128") == (128, 128)
    assert parse_size("96x128") == (96, 128)
    with pytest.raises(ValueError):
        parse_size("12xq")
    with pytest.raises(ValueError):
        parse_size("0x5")


def test_cpu_busy_measures_a_fraction():
    busy = bench.cpu_busy(0.05)
    assert busy["others"] >= 0 and busy["load_per_core"] >= 0


def test_bench_times_a_real_image_forward_and_end_to_end(tmp_path):
    from conftest import photo_crop

    image = photo_crop(tmp_path / "photo.jpg", box=(0, 0, 40, 30))
    results = run_bench("agdn", 2, sizes=[(32, 32)], repeats=2, warmup=1, threads=1, weights="random",
                        folder_images=0, force=True, reference_impl=False, image=str(image))
    row = next(r for r in results if r["kind"] == "image")
    assert row["size"] == [30, 40] and row["output_size"] == [60, 80] and row["file"] == str(image)
    for key in ("forward", "end_to_end"):
        assert len(row["times_s"][key]) == 2 and row[f"{key}_s"]["median"] > 0
        assert row["us_per_lr_pixel"][key] == pytest.approx(row[f"{key}_s"]["median"] / 1200 * 1e6)
        base = row["first_size_forward_us_per_lr_pixel"]
        assert row["vs_first_size_forward"][key] == pytest.approx(row["us_per_lr_pixel"][key] / base)
    assert row["protocol"] == "reference" and row["tiles_per_forward"] == 1 and row["fp32_fallbacks"] == 0
    assert row["end_to_end_peak_memory_mb"] > 0 and row["peak_memory_mb"] > 0
    assert list(tmp_path.iterdir()) == [image]  # outputs went to a temporary folder
    table = io.StringIO()
    format_table(results, Console(file=table, width=200))
    assert "end to end" in table.getvalue() and "us/px" in table.getvalue()


@pytest.mark.parametrize("model,scale", [("esc-light", 2), ("asid", 2)])
def test_bench_times_esc_and_asid_beside_their_straight_modules(model, scale):
    from upscale.models import kernels

    results = run_bench(model, scale, sizes=["24x40"], repeats=1, warmup=1, threads=1, weights="random",
                        folder_images=0, force=True)
    assert [r["impl"] for r in results] == ["fast", "straight"]
    assert results[0]["speedup_vs_straight"] > 0 and results[0]["model"] == model
    if kernels.load() is not None:
        assert results[0]["cpu_kernels"].startswith("fused CPU kernels")
