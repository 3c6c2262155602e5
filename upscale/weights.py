"""Weights: find them, download and verify them, convert official .pth files, load them strictly.

Resolution order for a registry entry (first hit wins):
  1. an explicit file (`--weights FILE`)
  2. `$UPSCALE_WEIGHTS_DIR/<entry.file>`
  3. the user cache, `$UPSCALE_CACHE_DIR` or `$XDG_CACHE_HOME/upscale` or `~/.cache/upscale`
  4. the weights shipped inside the package (AGDN x2/x3/x4)
  5. the entry's source: downloaded, sha256-checked, converted to .safetensors and cached
Run time reads only .safetensors (nothing is unpickled); `convert_checkpoint` is the one place that opens a
.pth, with `torch.load(weights_only=True)`.

Sources (the `url` of a `weights.toml` entry):
  - `https://HOST/PATH` (also `http://`, `file://`): streamed with urllib into a temporary file inside the
    cache folder.
  - `hf://OWNER/REPO[@REVISION]/PATH/IN/REPO`: a file of a Hugging Face model repository, fetched with
    `huggingface_hub.hf_hub_download` into the Hugging Face cache (so HF_HOME, HF_HUB_CACHE, HF_ENDPOINT and
    HF_TOKEN apply as usual, and a file already there is used offline).
Either way the file is checked against the entry's sha256 (where the registry knows it), converted (every key
and shape checked against our model) and only then renamed into the cache: a failed, cut-short or tampered
download leaves nothing behind, not even a temporary file. (A download killed mid-way leaves hidden
`.download-*` / `.*.part` entries, never at a name that is looked up; the next fetch clears them once they are a
day old.) The cached .safetensors records its provenance (source URL, where it was actually downloaded from,
the file's sha256 and whether it matched the registry, the checkpoint key used, the model) in its metadata.

Environment:
  UPSCALE_WEIGHTS_DIR       a folder of converted .safetensors, searched before the cache
  UPSCALE_CACHE_DIR         the cache folder (default `$XDG_CACHE_HOME/upscale`, else `~/.cache/upscale`)
  UPSCALE_MIRROR            base URL of a mirror of the official files, for users behind a proxy or without
                            access to the original hosts: an official `https://HOST/PATH` is downloaded from
                            `$UPSCALE_MIRROR/HOST/PATH` instead (the layout `wget -x URL` creates; a
                            `file:///folder` mirror works too). The registry's sha256 still applies and the
                            provenance keeps the official URL. Hub (`hf://`) sources use HF_ENDPOINT instead.
  UPSCALE_DOWNLOAD_TIMEOUT  seconds to wait for a server before giving up (default 60)
  HF_HUB_OFFLINE=1          like `--offline`: never touch the network; the error names the missing file.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__, registry
from .files import atomic_path, cache_dir
from .models import FAMILIES, get_architecture
from .registry import ModelEntry

# keys that official training frameworks wrap the state dict in, most preferred first
WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")

HF_SCHEME = "hf://"
DEFAULT_TIMEOUT = 60.0

Progress = Callable[[int, "int | None"], None]


class WeightsError(RuntimeError):
    """Weights that are missing, corrupt, mismatched or of the wrong model; the message says which file.

    `remedy`, where there is one: "weights" (give a weights file), "model" (name the model and scale): the
    command line adds its flags."""

    def __init__(self, message: str, remedy: str | None = None):
        super().__init__(message)
        self.remedy = remedy


class _NotInHubCache(WeightsError):
    """Offline, and the hub file is not in the Hugging Face cache."""


def packaged_weights_dir() -> Path:
    return Path(str(resources.files("upscale").joinpath("weights")))


def candidate_paths(entry: ModelEntry) -> list[Path]:
    """Where a converted file for `entry` may already be, in resolution order (steps 2-4)."""
    dirs = []
    if os.environ.get("UPSCALE_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["UPSCALE_WEIGHTS_DIR"]))
    dirs += [cache_dir(), packaged_weights_dir()]
    return [d / entry.file for d in dirs]


def offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------- resolution


def resolve_weights(
    entry: ModelEntry,
    weights_file: str | Path | None = None,
    offline: bool = False,
    progress: Progress | None = None,
) -> Path:
    """The .safetensors file to load for `entry`, fetching it from its source if needed and allowed."""
    if weights_file is not None:
        path = Path(weights_file)
        if not path.is_file():
            raise WeightsError(f"{path}: weights file not found")
        return path
    for path in candidate_paths(entry):
        if path.is_file():
            return path
    searched = ", ".join(str(p.parent) for p in candidate_paths(entry))
    if not entry.url:
        raise WeightsError(
            f"no weights for {entry.label}: {entry.note or 'no official source'}; "
            f"give a weights file, or put {entry.file} in one of: {searched}", remedy="weights"
        )
    if offline or offline_requested():
        missing = f"offline: {entry.file} for {entry.label} is not in {searched}"
        if is_hub_source(entry.url):  # a file already in the Hugging Face cache needs no network
            try:
                return fetch(entry, progress=progress, offline=True)
            except _NotInHubCache:
                hub = parse_hub_url(entry.url)
                missing += f", nor is {hub.filename} of {hub.repo_id} in the Hugging Face cache"
        raise WeightsError(f"{missing}; run `upscale fetch {entry.name} -s {entry.scale}` when online")
    return fetch(entry, progress=progress)


# ------------------------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class HubFile:
    """A file of a Hugging Face model repository, from an `hf://OWNER/REPO[@REVISION]/PATH` source."""

    repo_id: str
    filename: str
    revision: str | None = None


def is_hub_source(url: str | None) -> bool:
    return bool(url) and url.startswith(HF_SCHEME)


def parse_hub_url(url: str) -> HubFile:
    """`hf://OWNER/REPO[@REVISION]/PATH/IN/REPO` -> its parts."""
    parts = url[len(HF_SCHEME):].split("/") if is_hub_source(url) else []
    if len(parts) < 3 or not all(parts):
        raise WeightsError(f"{url}: not a hub source; expected hf://OWNER/REPO[@REVISION]/FILE")
    repo, _, revision = parts[1].partition("@")
    if not repo or (_ and not revision):
        raise WeightsError(f"{url}: not a hub source; expected hf://OWNER/REPO[@REVISION]/FILE")
    return HubFile(f"{parts[0]}/{repo}", "/".join(parts[2:]), revision or None)


def mirrored(url: str) -> str:
    """The URL to download an official `url` from: itself, or its copy under `$UPSCALE_MIRROR`."""
    mirror = os.environ.get("UPSCALE_MIRROR", "").strip()
    parts = urllib.parse.urlsplit(url)
    if not mirror or parts.scheme not in ("http", "https"):
        return url
    tail = parts.netloc + parts.path + (f"?{parts.query}" if parts.query else "")
    return f"{mirror.rstrip('/')}/{tail}"


def download_timeout() -> float:
    raw = os.environ.get("UPSCALE_DOWNLOAD_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise WeightsError(f"UPSCALE_DOWNLOAD_TIMEOUT={raw!r}: expected a positive number of seconds")
    return value


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _network_reason(error: BaseException, timeout: float) -> str:
    if isinstance(error, TimeoutError):
        return f"no answer from the server within {timeout:g} s"
    if isinstance(error, http.client.IncompleteRead):
        return f"transfer cut short ({len(error.partial)} bytes received)"
    if isinstance(error, http.client.HTTPException):
        return f"bad answer from the server: {type(error).__name__} {_first_line(error)}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror if not error.filename else f"{error.strerror}: {error.filename}"
    return _first_line(error)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(
    url: str,
    dest: Path,
    sha256: str | None,
    progress: Progress | None = None,
    *,
    timeout: float | None = None,
):
    """Stream `url` to `dest` atomically; a short transfer or a checksum mismatch leaves nothing behind.

    `progress(done, total)` is called after every block (`total` is None when the server does not say).
    `timeout` (seconds, default `$UPSCALE_DOWNLOAD_TIMEOUT` or 60) bounds every wait for the server.
    Every failure is a one-line WeightsError that starts with the URL.
    """
    timeout = download_timeout() if timeout is None else timeout
    request = urllib.request.Request(url, headers={"User-Agent": f"upscale/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, atomic_path(dest) as tmp:
            total = response.headers.get("Content-Length")
            total = int(total) if total is not None and total.strip().isdigit() else None
            digest, done = hashlib.sha256(), 0
            with open(tmp, "wb") as out:
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
            if total is not None and done != total:
                raise WeightsError(f"{url}: transfer cut short ({done} of {total} bytes)")
            if sha256 and digest.hexdigest() != sha256.lower():
                raise WeightsError(f"{url}: sha256 mismatch (got {digest.hexdigest()}, expected {sha256.lower()})")
    except WeightsError:
        raise
    except urllib.error.HTTPError as e:
        e.close()
        raise WeightsError(f"{url}: download failed (HTTP {e.code} {e.reason})") from None
    except urllib.error.URLError as e:
        reason = e.reason if isinstance(e.reason, BaseException) else OSError(0, str(e.reason))
        raise WeightsError(f"{url}: download failed ({_network_reason(reason, timeout)})") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise WeightsError(f"{url}: download failed ({_network_reason(e, timeout)})") from None


STALE_AFTER_S = 24 * 3600


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporary files and folders of downloads killed mid-way (a day old or more): never used, so removed."""
    now = time.time()
    for path in folder.glob(".*"):
        if not (path.name.startswith(".download-") or path.name.endswith(".part")):
            continue
        try:
            if now - path.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError:
            pass


@contextmanager
def _scratch_dir() -> Iterator[Path]:
    """A private temporary folder inside the cache (same file system: the final rename is atomic)."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(folder)
        tmp = tempfile.mkdtemp(prefix=".download-", dir=folder)
    except OSError as e:
        raise WeightsError(
            f"cannot write to the weights cache {folder} ({_network_reason(e, 0)}); "
            "set UPSCALE_CACHE_DIR to a writable folder"
        ) from None
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hub_progress(progress: Progress):
    """A tqdm class that huggingface_hub drives and that reports to `progress(done, total)` instead."""
    from tqdm.auto import tqdm

    class HubProgress(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done = int(kwargs.get("initial") or 0)

        def update(self, n=1):
            self._done += int(n or 0)
            progress(self._done, self.total)
            return True

    return HubProgress


def _hub_download(entry: ModelEntry, progress: Progress | None, offline: bool) -> Path:
    """The entry's hub file in the Hugging Face cache, downloaded there if needed (never when offline)."""
    hub = parse_hub_url(entry.url)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise WeightsError(
            f"{entry.url}: hub sources need the huggingface-hub package (pip install huggingface-hub)"
        ) from None
    extra = {"tqdm_class": _hub_progress(progress)} if progress else {}
    try:
        path = hf_hub_download(
            hub.repo_id, hub.filename, revision=hub.revision, local_files_only=offline,
            library_name="upscale", library_version=__version__, **extra,
        )
    except Exception as e:  # huggingface_hub raises many types (HTTP, offline, network, validation)
        if offline:
            raise _NotInHubCache(
                f"offline: {hub.filename} of {hub.repo_id} (for {entry.label}) is not in the Hugging Face cache"
            ) from None
        raise WeightsError(f"{entry.url}: download from the Hugging Face hub failed ({_first_line(e)})") from None
    return Path(path)


def _source_name(url: str) -> str:
    if is_hub_source(url):
        return Path(parse_hub_url(url).filename).name
    return Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or "checkpoint.pth"


def fetch(
    entry: ModelEntry,
    progress: Progress | None = None,
    *,
    offline: bool = False,
    force: bool = False,
) -> Path:
    """Download the official checkpoint of `entry`, verify it, convert it and cache the .safetensors.

    A file already in the cache is returned as is unless `force`. `offline` (or HF_HUB_OFFLINE) forbids the
    network: a hub source may still come from the Hugging Face cache, a plain URL cannot.
    """
    if not entry.url:
        raise WeightsError(f"no weights for {entry.label}: {entry.note or 'no official source'}")
    target = cache_dir() / entry.file
    if target.is_file() and not force:
        return target
    offline = offline or offline_requested()
    provenance = {"source_url": entry.url}
    if is_hub_source(entry.url):
        pth = _hub_download(entry, progress, offline)
        if entry.sha256 and (got := sha256_of(pth)) != entry.sha256.lower():
            raise WeightsError(f"{entry.url}: sha256 mismatch (got {got}, expected {entry.sha256.lower()}; "
                               f"file {pth} of the Hugging Face cache)")
        parts = pth.parts  # HF cache layout: .../snapshots/<commit>/<path in repo>
        depth = len(parse_hub_url(entry.url).filename.split("/"))
        if len(parts) > depth + 1 and parts[-depth - 2] == "snapshots":
            provenance["source_revision"] = parts[-depth - 1]
        convert_checkpoint(pth, target, entry, metadata=provenance)
        return target
    url = mirrored(entry.url)
    if offline:
        raise WeightsError(f"offline: {entry.file} for {entry.label} is not in the cache {cache_dir()}; "
                           f"it would be downloaded from {url}")
    if url != entry.url:
        provenance["downloaded_from"] = url
    with _scratch_dir() as tmp:
        pth = tmp / _source_name(entry.url)
        download(url, pth, entry.sha256, progress)
        convert_checkpoint(pth, target, entry, metadata=provenance)
    return target


# ------------------------------------------------------------------------------------------------ conversion


def _some_keys(mapping: Mapping) -> str:
    keys = [str(k) for k in mapping]
    return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")


def _unwrap(
    checkpoint: object, key: str | None, source: Path, strict_key: bool = False
) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside a loaded checkpoint.

    `key` (the registry's, or the user's with `strict_key`) is preferred; without it, or when the registry's
    key is absent, the first known wrapper key; else the checkpoint itself. A DataParallel `module.` prefix on
    every key is removed.
    """
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"{source}: not a state dict (a {type(checkpoint).__name__})")
    if key and key in checkpoint:
        state, used = checkpoint[key], key
    elif key and strict_key:
        raise WeightsError(f"{source}: has no {key!r} entry (it has: {_some_keys(checkpoint)})")
    else:
        used = next((k for k in WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping)), "")
        state = checkpoint[used] if used else checkpoint
    if not isinstance(state, Mapping):
        raise WeightsError(f"{source}: entry {used!r} is not a state dict (a {type(state).__name__})")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{source}: holds no tensors" + (f" under {used!r}" if used else ""))
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors, used


def detect(state_dict: Mapping[str, torch.Tensor]) -> ModelEntry | None:
    """The zoo entry these weights belong to, or None: the family that recognises them says what shape of
    network they hold (`Architecture.describe`), the zoo says which entries have that shape
    (`registry.match`), and the first whose keys and shapes equal the file's, built on the meta device (no
    memory), is the one."""
    for family in FAMILIES:
        found = get_architecture(family).describe(state_dict)
        if found is None:
            continue
        scale, facts = found
        for entry in registry.match(family, scale, facts):
            with torch.device("meta"):
                expected = build_model(entry).state_dict()
            if set(expected) == set(state_dict) and all(
                tuple(state_dict[k].shape) == tuple(v.shape) for k, v in expected.items()
            ):
                return entry
    return None


def build_model(entry: ModelEntry) -> nn.Module:
    return get_architecture(entry.family).build(entry.name, entry.scale, entry.hparams)


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: Path, entry: ModelEntry):
    """Every key present, none extra, every shape equal: else one message listing what differs."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
        raise WeightsError(f"{source}: not {entry.label} weights; " + "; ".join(parts))


def convert_checkpoint(
    src: Path,
    dst: Path,
    entry: ModelEntry | None = None,
    key: str | None = None,
    *,
    metadata: Mapping[str, str] | None = None,
) -> ModelEntry:
    """Official .pth -> .safetensors, with every key and shape checked against our model.

    Without `entry` the model is detected from the keys and shapes. `key` names the checkpoint entry holding
    the weights and must exist; without it the registry's key is preferred, else the usual wrapper keys are
    tried (`params_ema` before `params`). Provenance (source file and its sha256 and whether that matches the
    registry, the key used, the model, our version, plus `metadata`) goes into the safetensors metadata. The
    output appears only when everything succeeded. Returns the entry used.
    """
    src = Path(src)
    try:
        checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt pickle raises many different types
        raise WeightsError(f"{src}: cannot read as a PyTorch checkpoint ({_first_line(e)})") from None
    if key:
        state, used_key = _unwrap(checkpoint, key, src, strict_key=True)
    else:
        state, used_key = _unwrap(checkpoint, entry.key if entry else None, src)
    if entry is None:
        entry = detect(state)
        if entry is None:
            raise WeightsError(f"{src}: cannot tell which model these weights belong to; name the model and scale",
                               remedy="model")
    model = build_model(entry)
    check_state_dict(model, state, src, entry)
    check_finite(state, src)
    tensors = {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().clone()
               for k, v in state.items()}
    digest = sha256_of(src)
    if not entry.sha256:
        checksum = "no sha256 in the registry"
    elif digest == entry.sha256.lower():
        checksum = "matches the registry"
    else:
        checksum = "differs from the registry (not the official file)"
    info = {
        "model": entry.name, "family": entry.family, "scale": str(entry.scale),
        "source_file": src.name, "source_sha256": digest, "source_key": used_key, "source_checksum": checksum,
        "source_url": entry.url if entry.url and checksum == "matches the registry" else "",
        "license": entry.license, "converted_by": f"upscale {__version__} (upscale convert)",
    }
    info.update({str(k): str(v) for k, v in (metadata or {}).items()})
    try:
        with atomic_path(Path(dst)) as tmp:
            save_file(tensors, str(tmp), metadata=info)
    except OSError as e:
        raise WeightsError(f"{dst}: cannot write ({_network_reason(e, 0)})") from None
    return entry


# ------------------------------------------------------------------------------------------------ run time


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
        raise WeightsError(f"{path}: a pickled checkpoint; convert it first with `upscale convert {path}`")
    try:
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable .safetensors file ({_first_line(e)})") from None
    check_finite(tensors, path)
    return tensors


def check_finite(tensors: Mapping[str, torch.Tensor], source: Path) -> None:
    """A NaN or Inf anywhere in the weights turns the whole output black (or NaN): refuse such files at load."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise WeightsError(f"{source}: tensor {key} holds {bad} non-finite value{'s' * (bad > 1)} (NaN or Inf); "
                               "the file is corrupt")


def load_model(entry: ModelEntry, weights_path: Path) -> nn.Module:
    """Our network for `entry` with the file's weights, loaded strictly, in eval mode on the CPU."""
    state = read_safetensors(weights_path)
    model = build_model(entry)
    check_state_dict(model, state, Path(weights_path), entry)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)
