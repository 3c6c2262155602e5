"""Many machines: `upscale run INPUT... -o OUT --ray ADDRESS` runs a batch as a Ray Data job.

How it runs
- The driver (the `upscale` command) plans exactly as a local batch (`batch.plan_jobs`) and settles every job
  that needs no work exactly as `run_jobs` does (`batch.verdict`: planned conflicts and skips, outputs that
  exist), so that a rerun is a resume. Only the jobs left to do go to the cluster.
- Those jobs become a Ray Dataset of small JSON records (paths and flags, never pixels: a 12 MP photo at x4
  is 576 MB as uint8, and Ray's `read_images`/`write_images` would drop ICC, EXIF and 16 bits), cut into blocks
  of a few jobs so that every actor gets work and results come back while the run goes on. `map_batches`
  sends the blocks to a pool of `UpscaleActor`s (`ActorPoolStrategy(size=workers)`; one GPU each where the
  cluster has GPUs, else an equal share of the CPUs). Each actor loads the model once and runs the local
  batch's own `run_jobs` with its `UpscaleStages` (decode, upscale, encode, atomic write), so there is one
  implementation of decoding, metadata, upscaling, encoding and writing. It writes straight to the
  destination on the shared file system and returns one small result record per job.
- The driver streams those records back in completion order (`iter_rows`, in a thread) and reports them as a
  local batch does (JSON lines, per-image lines, a progress bar on a terminal), adding to each the worker that
  did it (node, ip, actor, pid); the summary adds images/s and output MP/s.

Faults
- A worker that dies (killed, out of memory, its node lost): Ray restarts the actor (`max_restarts=-1`) and
  retries its tasks (`max_task_retries=-1`), so a block may run twice. Writes are atomic (a hidden temporary,
  renamed into place), so no partial file is ever visible. A retried job whose output the first attempt had
  already written finds it and is "skipped: output exists" (the worker skips existing outputs: the driver only
  sent jobs whose output was missing, unless --overwrite). The hidden temporary of a killed write is removed
  by the next write into that folder (`files.remove_stale_temporaries`).
- A bad image is a failed record (one line, the batch goes on, exit 1): the actor catches every error of a job,
  so a job never fails the Ray job.
- A worker that cannot see an input the driver saw, or the output folder the driver made, fails those jobs with
  a message saying that --ray needs shared storage.
- Ctrl-C or SIGTERM on the driver: a tiny `Ledger` actor, which every worker asks before it starts an image, is
  told to stop. Workers finish the images under way (each write atomic) and start no new one; the driver waits
  for them, reports what was done and exits 130. A second Ctrl-C stops at once (an image being written then
  leaves at most a hidden temporary, removed by the next run). A rerun does exactly the missing images.

Storage: inputs and outputs must be on a POSIX file system that every node mounts at the same path (NFS,
Lustre, CephFS, GPFS, ...); relative paths are taken from the driver's working folder, which the workers
enter when they see it. Object-store URLs (s3://, gs://) are not supported.

Why Ray Data rather than hand-made actors: it already feeds a pool of actors with back-pressure, restarts them
and retries their work, and runs the same on one box and on a cluster. Its cost is a fixed start (the cluster,
then each actor importing torch and loading the model: 10-17 s more than a local batch on a busy 2-core VM) and
some scheduling per block (tens of ms on that VM), which blocks of up to 16 images spread;
`scripts/bench-ray` measures both.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .batch import Job, Outcome, UpscaleStages, _key, run_jobs, verdict

INSTALL = 'pip install "upscale[ray]" (in a checkout: pip install -e ".[ray]")'
SHARED_STORAGE = ("--ray needs the inputs and outputs on a file system that every node mounts at the same path "
                  "(shared storage)")
NOT_STARTED = "not started: the run was interrupted"
BLOCK_JOBS = 16  # most jobs in one Ray Data block: fewer blocks for big runs, results still come back often


class ClusterError(RuntimeError):
    """The cluster cannot be used (Ray missing, no cluster at the address, too few GPUs): one line."""


def require_ray():
    """The `ray` module with Ray Data, or ClusterError naming the install command."""
    # never start a cluster behind our back (Ray's calls start one when none is connected, e.g. in our result
    # thread after the run ended)
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ClusterError(f"--ray needs Ray, which is not installed here: {INSTALL}") from None
    return ray


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker needs to run jobs as the command line asked (small: it travels to each actor)."""

    entry: Any  # registry.ModelEntry
    weights: str | None  # an absolute path: the workers' working folder may differ
    options: Any  # options.EngineOptions
    offline: bool
    fmt: str | None
    quality: int
    overwrite: bool
    allow_large: bool
    provenance: dict  # its "device" is filled in by each worker
    cwd: str  # the driver's working folder, where relative paths start
    protect: tuple = ()  # destinations that are also inputs: never written over


@dataclass
class ClusterRun:
    outcomes: list[Outcome] = field(default_factory=list)
    interrupted: bool = False
    workers: int = 0
    seconds: float = 0.0  # from the dataset's start to its end (the cluster's start-up not included)
    output_pixels: int = 0
    error: str | None = None  # the Ray job failed after some jobs were reported


class Ledger:
    """Which jobs are under way, and whether the driver asked to stop: a tiny actor that every worker asks
    before it starts an image, so that after `stop` no image starts and the driver knows when the images under
    way are written. Job numbers are sets, so that a retried job counts once."""

    def __init__(self):
        self.stopped = False
        self.busy: set[int] = set()
        self.finished: set[int] = set()

    def start(self, index: int) -> bool:
        if self.stopped:
            self.busy.discard(index)  # a retry of a job under way when its worker died
            return False
        self.busy.add(index)
        return True

    def done(self, index: int) -> None:
        self.busy.discard(index)
        self.finished.add(index)

    def stop(self) -> None:
        self.stopped = True

    def state(self) -> tuple[int, int]:
        return len(self.busy), len(self.finished)


class _NotStarted(Exception):
    def __str__(self) -> str:
        return NOT_STARTED


class _WorkerStages:
    """UpscaleStages as a worker runs them: ask before starting each job, check that the shared storage is
    there, and note each output's size for the summary. `meta` maps id(job) to its record from the driver."""

    def __init__(self, inner, meta: dict, may_start: Callable[[int], bool], where: str):
        self.inner, self.meta, self.may_start, self.where = inner, meta, may_start, where
        self.started: set[int] = set()  # id(job)
        self.pixels: dict[int, int] = {}

    def read(self, job: Job):
        record = self.meta[id(job)]
        if not self.may_start(record["index"]):
            raise _NotStarted()
        self.started.add(id(job))
        if record["seen"] and not job.source.exists():
            raise OSError(f"{job.source}: not found on worker {self.where}, though the driver sees it; "
                          f"{SHARED_STORAGE}")
        root = record["root"]
        if root and not os.path.isdir(root):
            raise OSError(f"{job.dest}: the output folder {root} is not on worker {self.where}, though the driver "
                          f"sees it; {SHARED_STORAGE}")
        return self.inner.read(job)

    def compute(self, job: Job, data):
        return self.inner.compute(job, data)

    def write(self, job: Job, result) -> None:
        self.inner.write(job, result)
        from PIL import Image

        with contextlib.suppress(Exception):  # only for the summary's MP/s: never fail a written job
            with Image.open(job.dest) as im:
                self.pixels[id(job)] = im.size[0] * im.size[1]

    def nbytes(self, result) -> int:
        return self.inner.nbytes(result)


def process_jobs(records: list[dict], stages, *, overwrite: bool, base: dict, worker: dict,
                 may_start: Callable[[int], bool] = lambda index: True,
                 finished: Callable[[int], None] = lambda index: None, absolute: bool = False) -> list[dict]:
    """Run one block of jobs as the local batch does (`run_jobs`: read ahead, write behind, every error a
    failed job) and return one small result record per job. Plain Python: the actor calls it, tests too.

    `base` (device, working precision) and `worker` go into each record's fields. `absolute`: use the jobs'
    absolute paths (the driver's working folder is not on this worker)."""
    jobs, meta = [], {}
    for record in records:
        source, dest = (record["abs_source"], record["abs_dest"]) if absolute else (record["source"], record["dest"])
        job = Job(Path(source), Path(dest), from_folder=record["from_folder"], make_folder=record["make_folder"])
        jobs.append(job)
        meta[id(job)] = record
    guarded = _WorkerStages(stages, meta, may_start, worker.get("ip", "?"))
    rows = []

    def on_outcome(outcome: Outcome) -> None:
        record = meta[id(outcome.job)]
        started = id(outcome.job) in guarded.started
        if started:
            finished(record["index"])
        status = "not_started" if not started and outcome.error == NOT_STARTED else outcome.status
        rows.append({"index": record["index"], "status": status, "error": outcome.error, "remedy": outcome.remedy,
                     "seconds": outcome.seconds, "extra": {**base, **outcome.extra, "worker": worker},
                     "pixels": guarded.pixels.get(id(outcome.job), 0)})

    # the driver sent only jobs whose output was missing (or --overwrite): one that exists now was written by
    # an earlier attempt of this block (its worker died after the write) or by someone else: never replaced
    run_jobs(jobs, guarded, overwrite=overwrite, skip_existing=True, on_outcome=on_outcome, errors=(Exception,))
    return rows


def _whoami() -> dict:
    import ray

    context = ray.get_runtime_context()
    return {"node": context.get_node_id(), "ip": ray.util.get_node_ip_address(), "actor": context.get_actor_id(),
            "pid": os.getpid()}


class UpscaleActor:
    """One worker of the pool: loads the model once, then runs blocks of jobs (`process_jobs`)."""

    def __init__(self, settings: WorkerSettings, ledger=None):
        self.settings, self.ledger = settings, ledger
        self.worker = _whoami()
        self.base: dict = {"device": None, "precision": None}
        self.stages = None
        self.broken: str | None = None  # why this worker can run no job
        try:
            os.chdir(settings.cwd)
            self.absolute = False
        except OSError:
            self.absolute = True  # relative paths cannot be found here; absolute ones may
        try:
            self.stages = self._load(settings)
        except Exception as e:  # every job then fails with this line, instead of the pool dying over and over
            self.broken = f"cannot load the model on worker {self.worker['ip']}: {e}"

    def _load(self, settings: WorkerSettings) -> UpscaleStages:
        from .engine import Upscaler

        upscaler = Upscaler.load(settings.entry, settings.weights, settings.options, offline=settings.offline)
        upscaler.architecture.warm_up(upscaler.model, upscaler.device, lambda message: None)
        self.base = {"device": str(upscaler.device), "precision": upscaler.working_precision}
        provenance = {**settings.provenance, "device": str(upscaler.device)}
        return UpscaleStages(upscaler, settings.fmt, settings.quality, settings.overwrite, settings.allow_large,
                             settings.protect, provenance)

    def _may_start(self, index: int) -> bool:
        if self.ledger is None:
            return True
        import ray

        try:
            return ray.get(self.ledger.start.remote(index))
        except Exception:  # the ledger is gone (the driver is ending): start nothing more
            return False

    def _finished(self, index: int) -> None:
        if self.ledger is not None:
            self.ledger.done.remote(index)

    def __call__(self, batch: dict) -> dict:
        records = [json.loads(str(text)) for text in batch["job"]]
        if self.broken is not None:
            rows = [{"index": r["index"], "status": "failed", "error": f"{r['source']}: {self.broken}", "remedy": None,
                     "seconds": 0.0, "extra": {**self.base, "worker": self.worker}, "pixels": 0} for r in records]
        else:
            rows = process_jobs(records, self.stages, overwrite=self.settings.overwrite, base=self.base,
                                worker=self.worker, may_start=self._may_start, finished=self._finished,
                                absolute=self.absolute)
        return {"result": [json.dumps(row) for row in rows]}


def _quiet_ray_data() -> None:
    """Ray Data logs every dataset's start and end to the console; keep them in its log file only (our errors
    say what failed)."""
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.CRITICAL)


def _connect(ray, address: str) -> None:
    """`local`: a private cluster on this machine for this run; `auto`: the cluster RAY_ADDRESS or a running
    `ray start --head` names; else `host:port` of a cluster's head."""
    if address.startswith("ray://"):
        raise ClusterError(f"--ray {address}: Ray Client addresses are not supported (the driver must see the "
                           "shared storage); run upscale on a node of the cluster with --ray auto")
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    # ray.init installs its own SIGTERM handlers (exit, or abort with a stack dump); the command's own stop the
    # run gracefully (SIGTERM as Ctrl-C), so they are put back
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if address == "local":
            # only small records travel through the object store: a small one starts faster and leaves the RAM
            ray.init(address="local", object_store_memory=256 * 2**20, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = " (start one with `ray start --head`, or give --ray local)" if address == "auto" else ""
        raise ClusterError(f"--ray {address}: cannot connect to a Ray cluster{hint}: {first}") from None
    finally:
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)


def _pool(ray, workers: int | None) -> tuple[int, dict]:
    """How many actors, and what each asks of Ray: a GPU each where the cluster has GPUs (one actor per GPU by
    default), else an equal share of the CPUs (one actor per node by default, running on all its cores: on 2
    cores, two one-thread actors against one two-thread actor measured 420 against 470, 497 against 609 and 569
    against 536 ms per image in three runs, no clear gain for a model and an image's working memory per core;
    `--workers` may ask for more, smaller ones)."""
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if gpus:
        count = workers or gpus
        if count > gpus:
            raise ClusterError(f"--workers {count}: the cluster has {gpus} GPU(s), one worker each")
        return count, {"num_gpus": 1, "num_cpus": 1}
    node_cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes()
                 if node.get("Alive") and node["Resources"].get("CPU", 0) > 0]
    if not node_cpus:
        raise ClusterError("the Ray cluster has no CPU to run on")
    count = workers or len(node_cpus)
    cpus = sum(node_cpus)
    share = min(cpus // count, min(node_cpus)) if count <= cpus else cpus / count
    return count, {"num_cpus": max(share, 0.01)}


def run_on_cluster(jobs: list[Job], settings: WorkerSettings, *, address: str, workers: int | None,
                   overwrite: bool, skip_existing: bool | None, output_folder: str | None,
                   on_outcome: Callable[[Outcome], None], note: Callable[[str], None]) -> ClusterRun:
    """Run `jobs` on the Ray cluster at `address` (see the module docstring); outcomes are reported through
    `on_outcome` as they come (settled jobs first, then in completion order). Raises ClusterError (one line)
    when the cluster cannot be used before any job ran. Ctrl-C and SIGTERM end in a run with `interrupted`."""
    ray = require_ray()
    run = ClusterRun()
    todo: list[Job] = []
    settled: list[Outcome] = []
    for job in jobs:  # settled here exactly as a local batch settles them
        decided = verdict(job, overwrite=overwrite, skip_existing=skip_existing)
        if decided is None:
            todo.append(job)
        else:
            settled.append(decided)
    if output_folder and any(job.make_folder for job in todo):
        with contextlib.suppress(OSError):  # made here, so that workers can tell whether they see it
            Path(output_folder).mkdir(parents=True, exist_ok=True)
    sources = {_key(job.source) for job in jobs}
    settings = replace(settings, protect=tuple(str(job.dest) for job in todo if _key(job.dest) in sources))
    records = [json.dumps(_record(i, job, output_folder)) for i, job in enumerate(todo)]

    # Ray prints what its workers report (a worker died, a task is retried) on stdout: stdout is for data here,
    # so while Ray runs, Python's stdout is stderr (the command's reporter writes to the real one)
    streaming = False
    with contextlib.redirect_stdout(sys.stderr):
        try:
            if todo:  # a finished run again needs no cluster
                _connect(ray, address)  # before anything is reported: a cluster that is not there is a usage error
                _quiet_ray_data()
                run.workers, resources = _pool(ray, workers)
            for outcome in settled:
                run.outcomes.append(outcome)
                on_outcome(outcome)
            if todo:
                streaming = True
                _stream(ray, todo, records, settings, resources, run, on_outcome, note)
        except KeyboardInterrupt:  # while connecting or starting: nothing is under way
            run.interrupted = True
        except ClusterError as e:
            if not streaming:
                raise
            run.error = str(e)  # the Ray job failed midway: what was done is reported, the rest not started
        finally:
            if todo:
                with contextlib.suppress(Exception, KeyboardInterrupt):
                    ray.shutdown()
    return run


def _record(index: int, job: Job, output_folder: str | None) -> dict:
    """What a worker gets for a job: its paths as given and absolute, and what the driver saw, so that a worker
    that does not see the same files says so."""
    root = output_folder if job.make_folder else str(job.dest.parent)
    return {"index": index, "source": str(job.source), "dest": str(job.dest),
            "abs_source": os.path.abspath(job.source), "abs_dest": os.path.abspath(job.dest),
            "from_folder": job.from_folder, "make_folder": job.make_folder, "seen": job.source.exists(),
            "root": os.path.abspath(root) if root and os.path.isdir(root) else None}


_END = object()


def _stream(ray, todo: list[Job], records: list[str], settings: WorkerSettings, resources: dict, run: ClusterRun,
            on_outcome: Callable[[Outcome], None], note: Callable[[str], None]) -> None:
    """Run the dataset and report its records as they come; on Ctrl-C stop gracefully (see the docstring)."""
    from ray.data import ActorPoolStrategy, DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # ours is on stderr, per image
    context.execution_options.preserve_order = False  # completion order
    per_block = max(1, min(BLOCK_JOBS, math.ceil(len(todo) / (run.workers * 4))))  # >= 4 blocks per actor
    ledger = ray.remote(num_cpus=0)(Ledger).remote()
    dataset = ray.data.from_items([{"job": r} for r in records], override_num_blocks=math.ceil(len(todo) / per_block))
    results = dataset.map_batches(
        UpscaleActor, fn_constructor_kwargs={"settings": settings, "ledger": ledger},
        compute=ActorPoolStrategy(size=run.workers), batch_size=per_block, batch_format="numpy", **resources)
    # no max_restarts / max_task_retries here: Ray Data's actor pools already restart a dead actor and retry its
    # tasks without limit (its defaults, -1 and -1; passing them is deprecated in Ray 2.60); the kill test holds it

    rows: queue.Queue = queue.Queue()

    def pump():  # in a thread: Ctrl-C (in the main thread) must not tear down Ray Data's iterator
        try:
            for row in results.iter_rows():
                rows.put(json.loads(row["result"]))
            rows.put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            rows.put(e)

    start = time.perf_counter()
    threading.Thread(target=pump, name="upscale-ray-results", daemon=True).start()
    reported: set[int] = set()
    stopping = False
    quiet_since = None  # when, after a stop, no image was under way any more
    while True:
        try:
            try:
                item = rows.get(timeout=0.2)
            except queue.Empty:
                if stopping:
                    try:
                        busy, finished = ray.get(ledger.state.remote(), timeout=30)
                    except Exception:  # noqa: BLE001 - the ledger cannot answer: nothing more to wait for
                        break
                    if busy == 0:
                        quiet_since = quiet_since or time.monotonic()
                        # every image started is written; wait (a little) for the records of the last ones
                        if len(reported) >= finished or time.monotonic() - quiet_since > 30:
                            break
                continue
            if item is _END:
                break
            if isinstance(item, BaseException):
                first = (str(item).strip().splitlines() or [type(item).__name__])[0]
                raise ClusterError(f"the Ray job failed: {first}")
            if item["status"] == "not_started" or item["index"] in reported:
                continue
            reported.add(item["index"])
            run.output_pixels += item["pixels"]
            outcome = Outcome(todo[item["index"]], item["status"], item["error"], item["seconds"], item["extra"],
                              remedy=item["remedy"])
            run.outcomes.append(outcome)
            on_outcome(outcome)
        except KeyboardInterrupt:
            run.interrupted = True
            if stopping:
                note("interrupted again: stopped at once (an image being written leaves at most a hidden "
                     "temporary file, which the next run removes)")
                break
            stopping = True
            note("interrupted: finishing the images under way (Ctrl-C again to stop at once)")
            with contextlib.suppress(Exception):
                ray.get(ledger.stop.remote(), timeout=30)
    run.seconds = time.perf_counter() - start
