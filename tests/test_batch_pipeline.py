"""`batch.run_jobs` as a pipeline: read-ahead and background writes, with the batch guarantees kept (order,
no overwrite, failures isolated, interrupts leave only complete files). Stages here are plain Python, no
model: what is tested is the scheduling."""

import threading
import time
from pathlib import Path

import pytest

from upscale import batch
from upscale.batch import Job, run_jobs

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # runs AGDN on the CPU


class Recorder:
    """Stages that log what ran where; `fail_read`/`fail_write` name sources that fail at that step."""

    def __init__(self, fail_read=(), fail_write=(), compute_s=0.02, write_s=0.0, interrupt_at=None):
        self.events: list[tuple[str, str, str]] = []  # (step, source name, thread name)
        self.lock = threading.Lock()
        self.fail_read, self.fail_write = set(fail_read), set(fail_write)
        self.compute_s, self.write_s, self.interrupt_at = compute_s, write_s, interrupt_at
        self.held = 0  # results computed and not yet written
        self.max_held = 0

    def log(self, step, job):
        with self.lock:
            self.events.append((step, job.source.name, threading.current_thread().name))

    def read(self, job):
        self.log("read", job)
        if job.source.name in self.fail_read:
            raise OSError(f"{job.source}: cannot read")
        return job.source.read_text()

    def compute(self, job, data):
        self.log("compute", job)
        if job.source.name == self.interrupt_at:
            raise KeyboardInterrupt
        time.sleep(self.compute_s)
        with self.lock:
            self.held += 1
            self.max_held = max(self.max_held, self.held)
        return data.upper(), {"n": len(data)}

    def write(self, job, result):
        self.log("write", job)
        time.sleep(self.write_s)
        try:
            if job.source.name in self.fail_write:
                raise OSError(f"{job.dest}: cannot write")
            if job.dest.exists():
                raise OSError(f"{job.dest}: already exists")
            job.dest.write_text(result)
        finally:
            with self.lock:
                self.held -= 1

    def nbytes(self, result):
        return len(result)


def jobs_for(tmp_path: Path, names, dests=None) -> list[Job]:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    jobs = []
    for i, name in enumerate(names):
        (src / name).write_text(f"image {name}")
        jobs.append(Job(src / name, out / (dests[i] if dests else f"{name}.out"), from_folder=True))
    return jobs


def run(jobs, stages, overlap=True, **kw):
    seen = []
    outcomes = run_jobs(jobs, stages, overwrite=kw.get("overwrite", False), skip_existing=None,
                        on_outcome=seen.append, errors=(OSError,), overlap=overlap)
    assert seen == outcomes
    return outcomes


def test_overlapped_reads_ahead_writes_behind_and_reports_in_order(tmp_path):
    names = [f"{i}.png" for i in range(5)]
    jobs = jobs_for(tmp_path, names)
    rec = Recorder(write_s=0.03)
    outcomes = run(jobs, rec)
    assert [o.job.source.name for o in outcomes] == names and all(o.status == "ok" for o in outcomes)
    assert all(o.extra == {"n": len(f"image {n}")} and o.seconds > 0 for o, n in zip(outcomes, names))
    for name in names:
        assert (tmp_path / "out" / f"{name}.out").read_text() == f"IMAGE {name}".upper()
    threads = {step: {t for s, _, t in rec.events if s == step} for step in ("read", "compute", "write")}
    assert threads["compute"] == {threading.main_thread().name}
    assert all(t.startswith("upscale-write") for t in threads["write"])
    assert any(t.startswith("upscale-read") for t in threads["read"])
    order = [(s, n) for s, n, _ in rec.events]
    # the next image is read before the current one has finished computing, and written while the next computes
    assert order.index(("read", "1.png")) < order.index(("compute", "1.png"))
    assert order.index(("write", "0.png")) < order.index(("compute", "2.png"))
    assert rec.max_held <= 2  # one result waiting for its write, one just computed


def test_sequential_mode_finishes_each_job_before_the_next(tmp_path):
    names = [f"{i}.png" for i in range(3)]
    rec = Recorder()
    outcomes = run(jobs_for(tmp_path, names), rec, overlap=False)
    assert [o.status for o in outcomes] == ["ok"] * 3
    steps = [(s, n) for s, n, _ in rec.events]
    assert steps == [(s, n) for n in names for s in ("read", "compute", "write")]
    assert rec.max_held == 1


def test_failures_stay_with_their_job_and_the_batch_goes_on(tmp_path):
    names = ["a.png", "b.png", "c.png", "d.png"]
    rec = Recorder(fail_read={"b.png"}, fail_write={"c.png"})
    outcomes = run(jobs_for(tmp_path, names), rec)
    assert [o.status for o in outcomes] == ["ok", "failed", "failed", "ok"]
    assert "b.png: cannot read" in outcomes[1].error and "c.png.out: cannot write" in outcomes[2].error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png.out", "d.png.out"]


def test_existing_outputs_are_skipped_without_being_read(tmp_path):
    names = ["a.png", "b.png", "c.png"]
    jobs = jobs_for(tmp_path, names)
    jobs[1].dest.write_text("done earlier")
    rec = Recorder()
    outcomes = run(jobs, rec)
    assert [o.status for o in outcomes] == ["ok", "skipped", "ok"]
    assert ("read", "b.png") not in [(s, n) for s, n, _ in rec.events]
    assert jobs[1].dest.read_text() == "done earlier"


def test_a_destination_shared_with_a_job_still_writing_is_not_overwritten(tmp_path):
    # a.png and a.jpg in a folder both map to a_x4.png: the second must find the first's file (and be skipped
    # as done), even while that file is still being written
    jobs = jobs_for(tmp_path, ["a.png", "a.jpg"], dests=["a_x4.png", "a_x4.png"])
    rec = Recorder(write_s=0.2)
    outcomes = run(jobs, rec)
    assert [o.status for o in outcomes] == ["ok", "skipped"]
    assert ("compute", "a.jpg") not in [(s, n) for s, n, _ in rec.events]
    assert jobs[0].dest.read_text() == "IMAGE A.PNG"
    jobs[1].from_folder = False  # named explicitly: an existing output is a failure, not a skip
    jobs[0].dest.unlink()
    outcomes = run(jobs, Recorder(write_s=0.2))
    assert [o.status for o in outcomes] == ["ok", "failed"] and "already exists" in outcomes[1].error


def test_interrupt_lets_started_writes_finish_and_reports_them(tmp_path):
    names = [f"{i}.png" for i in range(5)]
    jobs = jobs_for(tmp_path, names)
    rec = Recorder(write_s=0.2, interrupt_at="2.png")
    with pytest.raises(KeyboardInterrupt) as info:
        run(jobs, rec)
    done = info.value.outcomes
    assert [o.job.source.name for o in done] == ["0.png", "1.png"] and all(o.status == "ok" for o in done)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png.out", "1.png.out"]


def test_a_huge_result_is_written_before_the_next_job_computes(tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "WRITE_BEHIND_BYTES", 4)  # every result counts as huge
    rec = Recorder(write_s=0.02)
    outcomes = run(jobs_for(tmp_path, ["a.png", "b.png", "c.png"]), rec)
    assert [o.status for o in outcomes] == ["ok"] * 3 and rec.max_held == 1
