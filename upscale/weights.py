"""Weights: find them, download and verify them, convert official .pth files, load them strictly.

Resolution order for a registry entry (first hit wins):
  1. an explicit file (`--weights FILE`)
  2. `$UPSCALE_WEIGHTS_DIR/<entry.file>`
  3. the user cache, `$UPSCALE_CACHE_DIR` or `$XDG_CACHE_HOME/upscale` or `~/.cache/upscale`
  4. the weights shipped inside the package (AGDN x2/x3/x4)
  5. the entry's source URL: downloaded, sha256-checked, converted to .safetensors and cached
Run time reads only .safetensors (nothing is unpickled); `convert_checkpoint` is the one place that opens a
.pth, with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .models import FAMILIES, get_architecture
from .registry import ModelEntry, all_entries

# keys that official training frameworks wrap the state dict in, most preferred first
WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")


class WeightsError(RuntimeError):
    """Weights that are missing, corrupt, mismatched or of the wrong model; the message says which file."""


def cache_dir() -> Path:
    if os.environ.get("UPSCALE_CACHE_DIR"):
        return Path(os.environ["UPSCALE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "upscale"


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
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve_weights(
    entry: ModelEntry,
    weights_file: str | Path | None = None,
    offline: bool = False,
    progress: Callable[[int, int | None], None] | None = None,
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
            f"pass --weights FILE or put {entry.file} in one of: {searched}"
        )
    if offline or offline_requested():
        raise WeightsError(f"offline: {entry.file} for {entry.label} is not in {searched}; run `upscale fetch {entry.name} -s {entry.scale}` when online")
    return fetch(entry, progress=progress)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside `target`, renamed onto it only if the block succeeds; removed otherwise."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def download(url: str, dest: Path, sha256: str | None, progress: Callable[[int, int | None], None] | None = None):
    """Stream `url` to `dest` atomically; a short transfer or a checksum mismatch leaves nothing behind."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(dest) as tmp:
            total = response.headers.get("Content-Length")
            total = int(total) if total is not None else None
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
            if sha256 and digest.hexdigest() != sha256:
                raise WeightsError(f"{url}: sha256 mismatch (got {digest.hexdigest()}, expected {sha256})")
    except urllib.error.HTTPError as e:
        raise WeightsError(f"{url}: download failed (HTTP {e.code} {e.reason})") from None
    except (urllib.error.URLError, OSError) as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f"{url}: download failed ({getattr(e, 'reason', e)})") from None


def fetch(entry: ModelEntry, progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Download the official checkpoint of `entry`, verify it, convert it and cache the .safetensors."""
    target = cache_dir() / entry.file
    with tempfile.TemporaryDirectory(dir=_ensure(cache_dir())) as tmp:
        pth = Path(tmp) / Path(entry.url).name
        download(entry.url, pth, entry.sha256, progress)
        convert_checkpoint(pth, target, entry)
    return target


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _unwrap(checkpoint: object, key: str | None, source: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside a loaded checkpoint: `key` if given, else the first known wrapper key."""
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"{source}: not a state dict (a {type(checkpoint).__name__})")
    if key:
        if key not in checkpoint:
            raise WeightsError(f"{source}: has no {key!r} entry (it has: {', '.join(map(str, checkpoint))})")
        state, used = checkpoint[key], key
    else:
        used = next((k for k in WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping)), "")
        state = checkpoint[used] if used else checkpoint
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{source}: holds no tensors")
    return tensors, used


def detect(state_dict: Mapping[str, torch.Tensor]) -> ModelEntry | None:
    """The registry entry whose family recognises these keys and shapes, or None."""
    for family in FAMILIES:
        found = get_architecture(family).detect(state_dict)
        if found:
            variant, scale = found
            for entry in all_entries():
                if (entry.name, entry.scale) == (variant, scale):
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


def convert_checkpoint(src: Path, dst: Path, entry: ModelEntry | None = None, key: str | None = None) -> ModelEntry:
    """Official .pth -> .safetensors, with every key and shape checked against our model.

    Without `entry` the model is detected from the keys and shapes. Provenance (source file and its sha256,
    the key used, the model, our version) goes into the safetensors metadata. Returns the entry used.
    """
    src = Path(src)
    try:
        checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt pickle raises many different types
        raise WeightsError(f"{src}: cannot read as a PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    state, used_key = _unwrap(checkpoint, key if key is not None else (entry.key if entry else None), src)
    if entry is None:
        entry = detect(state)
        if entry is None:
            raise WeightsError(f"{src}: cannot tell which model these weights belong to; pass -m MODEL -s SCALE")
    model = build_model(entry)
    check_state_dict(model, state, src, entry)
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    metadata = {
        "model": entry.name, "family": entry.family, "scale": str(entry.scale),
        "source_file": src.name, "source_sha256": sha256_of(src), "source_key": used_key,
        "source_url": entry.url or "", "license": entry.license,
        "converted_by": f"upscale {__version__} (upscale convert)",
    }
    with atomic_path(Path(dst)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return entry


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix in (".pth", ".pt", ".ckpt"):
        raise WeightsError(f"{path}: a pickled checkpoint; convert it first with `upscale convert {path}`")
    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable .safetensors file ({e})") from None


def load_model(entry: ModelEntry, weights_path: Path) -> nn.Module:
    """Our network for `entry` with the file's weights, loaded strictly, in eval mode on the CPU."""
    state = read_safetensors(weights_path)
    model = build_model(entry)
    check_state_dict(model, state, Path(weights_path), entry)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)
