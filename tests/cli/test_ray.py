"""`upscale run --ray`: a batch on a Ray cluster (a local one, on the CPU) gives what a local batch gives, survives
a killed worker, stops cleanly when interrupted and resumes; without Ray it is one line.

The console script runs in subprocesses on tiny images at x2. One test starts its own cluster (`--ray local`);
the others share one that this module starts (`--ray HOST:PORT`), so that a cluster starts twice, not five times.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from conftest import interrupt_once_written, run, upscale_cmd
from PIL import Image

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'; the test extra has it)")

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # the workers run AGDN on the CPU (kernels built once here)

TIMING = {"seconds", "worker"}  # fields that differ between two runs of the same jobs


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster (2 CPUs) that this test process owns; its address for `--ray`."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 2**20, logging_level="ERROR")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()  # stops the processes this cluster started, and no others


def pixels(h: int, w: int, channels: int, seed: int, dtype=np.uint8) -> np.ndarray:
    """A smooth picture with some texture (a model's output on pure noise says little)."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    y, x = np.mgrid[0:h, 0:w]
    planes = [(np.sin(x / (3 + c + seed % 5)) + np.cos(y / (4 + c))) * 0.25 + 0.5 for c in range(channels)]
    image = np.stack(planes, axis=-1) + rng.normal(0, 0.05, (h, w, channels))
    return (np.clip(image, 0, 1) * top).astype(dtype)


def mixed_tree(root: Path) -> Path:
    """20 images of every kind a folder holds, in sub-folders, plus a corrupt image and a file that is not one."""
    for i in range(8):
        folder = root if i < 3 else root / "sub" if i < 6 else root / "sub" / "deeper"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels(24, 32, 3, i)).save(folder / f"rgb{i}.png")
    for i in range(3):
        Image.fromarray(pixels(24, 32, 4, 10 + i), "RGBA").save(root / "sub" / f"rgba{i}.png")
    for i in range(2):
        (root / f"deep{i}.png").write_bytes(imagecodecs.png_encode(pixels(24, 32, 3, 20 + i, np.uint16)))
    (root / "sub" / "deep_rgba.png").write_bytes(imagecodecs.png_encode(pixels(24, 32, 4, 23, np.uint16)))
    for i in range(2):
        Image.fromarray(pixels(24, 32, 1, 30 + i)[..., 0], "L").save(root / "sub" / f"grey{i}.png")
    Image.fromarray(pixels(24, 32, 3, 40)).save(root / "photo.jpg", quality=90)
    Image.fromarray(pixels(24, 32, 1, 41)[..., 0], "L").save(root / "sub" / "grey.jpg", quality=90)
    Image.fromarray(pixels(24, 32, 3, 42)).save(root / "sub" / "deeper" / "scan.tif")
    Image.fromarray(pixels(24, 32, 3, 43)).save(root / "web.webp", quality=90)
    whole = (root / "rgb0.png").read_bytes()
    (root / "sub" / "cut.png").write_bytes(whole[: len(whole) // 2])  # truncated: fails, the batch goes on
    (root / "notes.txt").write_text("not an image\n")
    return root


def json_lines(stdout: str) -> tuple[list[dict], dict]:
    objects = [json.loads(line) for line in stdout.splitlines()]
    assert objects and objects[-1].get("summary") is True, stdout
    return objects[:-1], objects[-1]


def our_errors(stderr: str) -> list[str]:
    """Our own error lines (Ray may add lines of its own about its workers)."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def comparable(record: dict, out: Path) -> str:
    """A record without what differs between two runs: timings, the worker, the output folder's name."""
    kept = {k: v for k, v in record.items() if k not in TIMING}
    if kept.get("output"):
        kept["output"] = str(Path(kept["output"]).relative_to(out))
    if record["status"] == "skipped":  # settled on the driver, where no model is loaded
        kept.pop("device"), kept.pop("precision")
    return json.dumps(kept, sort_keys=True)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ray_local_gives_the_local_batch_outputs_and_records(tmp_path):
    tree = mixed_tree(tmp_path / "tree")

    # the local batch, in a process that says at its end whether anything imported Ray
    local = tmp_path / "local"
    probe = ("import atexit, sys; atexit.register(lambda: sys.stderr.write(f\"RAY_IMPORTED={'ray' in sys.modules}\\n\"));"
             "from upscale.cli import main; main()")
    plain = subprocess.run([sys.executable, "-c", probe, str(tree), "-r", "-o", str(local), "-s", "2", "--json"],
                           capture_output=True, text=True)
    assert plain.returncode == 1, plain.stderr
    assert "RAY_IMPORTED=False" in plain.stderr, plain.stderr  # the plain command never imports Ray

    clustered = tmp_path / "ray"
    result = run(tree, "-r", "-o", clustered, "-s", "2", "--json", "--ray", "local", "--workers", "2")
    assert result.returncode == 1, result.stderr  # the corrupt image failed, the others were done
    assert "Traceback" not in result.stderr
    records, summary = json_lines(result.stdout)  # stdout holds JSON lines only, Ray's own messages included
    local_records, local_summary = json_lines(plain.stdout)

    # the same outputs, byte for byte, and the same records but for timings and the worker
    assert files(clustered) == files(local)
    assert len(files(local)) == 20
    assert sorted(comparable(r, clustered) for r in records) == sorted(comparable(r, local) for r in local_records)
    by_name = {Path(r["input"]).name: r for r in records}
    assert by_name["cut.png"]["status"] == "failed" and "cut.png" in by_name["cut.png"]["error"]
    assert by_name["notes.txt"]["status"] == "skipped" and by_name["notes.txt"]["error"] == "not an image"
    assert sum(r["status"] == "ok" for r in records) == 20
    assert our_errors(result.stderr) == [f"error: {by_name['cut.png']['error']}"]

    # each record says which worker did it; both workers did some; the summary has the throughput
    workers = {(r["worker"]["actor"], r["worker"]["pid"]) for r in records if r["status"] != "skipped"}
    assert len(workers) == 2, workers
    assert all(r["worker"]["node"] and r["worker"]["ip"] for r in records if "worker" in r)
    for key in ("ok", "skipped", "failed", "not_images", "total", "not_started", "interrupted"):
        assert summary[key] == local_summary[key], key
    assert summary["workers"] == 2 and summary["images_per_s"] > 0 and summary["output_mp_per_s"] > 0


def many_images(folder: Path, count: int, size: int = 64) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(pixels(size, size, 3, i)).save(folder / f"{i:02d}.png")
    return folder


def outputs(out: Path) -> list[Path]:
    return sorted(out.glob("*_x2.png"))


def no_temporaries(out: Path) -> None:
    hidden = [p.name for p in out.rglob(".*")]
    assert not hidden, hidden  # no temporary (.NAME.….part) left, however the run ended


def decodes_at(path: Path, size: tuple[int, int]) -> bool:
    with Image.open(path) as im:
        im.load()
        return im.size == size


def test_a_killed_worker_is_restarted_and_every_image_is_done(tmp_path, cluster):
    folder = many_images(tmp_path / "in", 16)
    out = tmp_path / "out"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([*upscale_cmd(), str(folder), "-o", str(out), "-s", "2", "--json", "--ray", cluster,
                                 "--workers", "2"], stdout=subprocess.PIPE, stderr=err, text=True)
    killed = None
    records = []
    try:
        for line in proc.stdout:  # records come as images finish: kill the worker of the first one
            records.append(json.loads(line))
            if killed is None and records[-1].get("status") == "ok":
                killed = records[-1]["worker"]
                os.kill(killed["pid"], signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    stderr = log.read_text()
    assert killed is not None, stderr
    assert proc.returncode == 0, stderr
    *records, summary = records
    assert summary["ok"] + summary["skipped"] == 16 and summary["failed"] == 0 and summary["not_started"] == 0
    # an image the dead worker had written before its block came back is found done when the block is retried
    assert all(r["status"] == "ok" or r["error"] == "output exists" for r in records), records
    # Ray restarted the killed actor (same actor, new process), which went on with the work
    assert any(r["worker"]["actor"] == killed["actor"] and r["worker"]["pid"] != killed["pid"] for r in records)
    assert len(outputs(out)) == 16 and all(decodes_at(p, (128, 128)) for p in outputs(out))
    no_temporaries(out)


def test_an_interrupted_run_exits_130_and_a_rerun_does_exactly_the_rest(tmp_path, cluster):
    folder = many_images(tmp_path / "in", 16)
    out = tmp_path / "out"
    ended = interrupt_once_written([folder, "-o", out, "-s", "2", "--ray", cluster, "--workers", "2"], out,
                                   signal.SIGINT)
    stdout, stderr = ended.stdout, ended.stderr
    assert ended.returncode == 130, stderr
    assert stdout == ""
    done = outputs(out)
    assert 0 < len(done) < 16, "the run ended before the signal"
    assert all(decodes_at(p, (128, 128)) for p in done)
    no_temporaries(out)
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted:") and f"{len(done)} done" in last and "not started" in last, stderr
    before = {p.name: p.stat().st_mtime_ns for p in done}

    rerun = run(folder, "-o", out, "-s", "2", "--json", "--ray", cluster, "--workers", "2")
    assert rerun.returncode == 0, rerun.stderr
    records, summary = json_lines(rerun.stdout)
    made = {Path(r["output"]).name for r in records if r["status"] == "ok"}
    kept = {Path(r["output"]).name for r in records if r["status"] == "skipped" and r["error"] == "output exists"}
    assert kept == set(before) and made == {p.name for p in outputs(out)} - set(before)
    assert len(outputs(out)) == 16 and summary["ok"] == 16 - len(before)
    assert {p.name: p.stat().st_mtime_ns for p in outputs(out) if p.name in before} == before  # untouched


def test_without_ray_installed_it_is_one_line_naming_the_install(tmp_path):
    Image.fromarray(pixels(24, 32, 3, 0)).save(tmp_path / "a.png")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None  # as if Ray were not installed\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([*upscale_cmd(), str(tmp_path / "a.png"), "--ray", "local"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: --ray needs Ray"), result.stderr
    assert 'pip install "upscale[ray]"' in result.stderr and 'pip install -e ".[ray]"' in result.stderr
    assert not (tmp_path / "a_x4.png").exists()


@pytest.mark.parametrize("args, needle", [
    (["--workers", "2"], "--workers is for a Ray cluster"),
    (["-", "--ray", "local"], "stdin and stdout (-) cannot be used"),
    (["--ray", "ray://head:10001"], "Ray Client addresses are not supported"),
], ids=["workers-without-ray", "stdin", "ray-client"])
def test_ray_usage_errors_exit_2_with_one_line(tmp_path, args, needle):
    Image.fromarray(pixels(24, 32, 3, 0)).save(tmp_path / "a.png")
    inputs = [] if "-" in args else [tmp_path / "a.png"]
    result = run(*inputs, *args)
    assert result.returncode == 2, result.stderr
    assert our_errors(result.stderr) == result.stderr.splitlines() and len(our_errors(result.stderr)) == 1
    assert needle in result.stderr, result.stderr


def test_a_worker_that_cannot_see_the_shared_files_fails_those_jobs_saying_so(tmp_path):
    """The worker's side without Ray: an input the driver saw, or the output folder it made, that the worker
    does not find fails its job with a message naming shared storage; a job asked to stop is not started."""
    from upscale.cluster import SHARED_STORAGE, process_jobs

    class Untouched:  # the checks come before any stage runs
        def read(self, job):
            raise AssertionError("read")

    (tmp_path / "out").mkdir()
    (tmp_path / "here.png").write_bytes(b"")

    def record(index, source, root, seen=True):
        return {"index": index, "source": str(source), "dest": str(tmp_path / "out" / f"{index}.png"),
                "abs_source": str(source), "abs_dest": str(tmp_path / "out" / f"{index}.png"), "from_folder": True,
                "make_folder": True, "seen": seen, "root": str(root)}

    finished = []
    rows = process_jobs([record(0, tmp_path / "gone.png", tmp_path / "out"),
                         record(1, tmp_path / "here.png", tmp_path / "elsewhere")],
                        Untouched(), overwrite=False, base={"device": "cpu"}, worker={"ip": "10.0.0.7"},
                        finished=finished.append)
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert rows[0]["error"].startswith(f"{tmp_path / 'gone.png'}: not found on worker 10.0.0.7")
    assert "output folder" in rows[1]["error"] and str(tmp_path / "elsewhere") in rows[1]["error"]
    assert all(SHARED_STORAGE in r["error"] for r in rows)
    assert finished == [0, 1] and rows[0]["extra"] == {"device": "cpu", "worker": {"ip": "10.0.0.7"}}

    stopped = process_jobs([record(2, tmp_path / "here.png", tmp_path / "out")], Untouched(), overwrite=False,
                           base={}, worker={}, may_start=lambda index: False, finished=finished.append)
    assert [r["status"] for r in stopped] == ["not_started"] and finished == [0, 1]
