"""Downloading weights, for real: a local HTTP server on 127.0.0.1 serves official-layout checkpoints.

Nothing is mocked: urllib (and huggingface_hub for `hf://` sources) talk to a server in a thread of this test
process whose handler we control (it counts every request, can cut a transfer short or answer 404). Registry
entries are pointed at it with `dataclasses.replace`, and the real `upscale` command reaches it through the
`UPSCALE_MIRROR` setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import AGDN_PTH, REPO, load_golden, need
from PIL import Image
from safetensors import safe_open

from upscale import registry
from upscale.weights import (
    WeightsError,
    convert_checkpoint,
    download,
    fetch,
    load_model,
    mirrored,
    parse_hub_url,
    read_safetensors,
    resolve_weights,
    sha256_of,
)

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # runs AGDN on the CPU

EXAMPLE = REPO / "examples" / "cat.png"
COMMIT = hashlib.sha1(b"upscale test repo").hexdigest()  # the fake hub's commit id


def upscale_cmd() -> list[str]:
    script = Path(sys.executable).parent / "upscale"
    return [str(script)] if script.exists() else [sys.executable, "-m", "upscale.cli"]


def require_family(family: str):
    if family == "esc":
        try:
            import upscale.models.esc  # noqa: F401
        except ImportError:
            pytest.skip("ESC model not landed")


# ------------------------------------------------------------------------------------------- the server


class Site:
    """What the local server serves, and a log of every request it got."""

    def __init__(self):
        self.files: dict[str, bytes] = {}  # path -> body
        self.truncated: dict[str, bytes] = {}  # path -> body announced 1000 bytes longer, then cut
        self.hub: dict[str, bytes] = {}  # "owner/repo/file" -> body, served the way the Hugging Face hub does
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.base = ""

    def url(self, path: str) -> str:
        return self.base + path

    def count(self, method: str | None = None) -> int:
        with self.lock:
            return sum(1 for m, _ in self.requests if method in (None, m))


def _handler(site: Site):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output clean
            pass

        def _hub_file(self) -> bytes | None:
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) >= 5 and parts[2] == "resolve":  # /owner/repo/resolve/revision/file
                return site.hub.get("/".join(parts[:2] + parts[4:]))
            return None

        def _answer(self, head: bool):
            with site.lock:
                site.requests.append(("HEAD" if head else "GET", self.path))
            hub = self._hub_file()
            if hub is not None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(hub)))
                self.send_header("ETag", f'"{hashlib.sha256(hub).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                if not head:
                    self.wfile.write(hub)
            elif self.path in site.files:
                body = site.files[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)
            elif self.path in site.truncated:
                body = site.truncated[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + 1000))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True
            else:
                body = b"not found\n"
                self.send_response(404)
                if "/resolve/" in self.path:
                    self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        def do_GET(self):
            self._answer(head=False)

        def do_HEAD(self):
            self._answer(head=True)

    return Handler


@pytest.fixture
def site():
    site = Site()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(site))
    server.daemon_threads = True
    site.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield site
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty private cache; no weights folder, mirror or offline flag from the caller's environment."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("UPSCALE_CACHE_DIR", str(folder))
    for name in ("UPSCALE_WEIGHTS_DIR", "UPSCALE_MIRROR", "UPSCALE_DOWNLOAD_TIMEOUT", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return folder


def leftovers(folder: Path) -> list[str]:
    """Everything under a folder, hidden temporary files and folders included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def one_line(message: str) -> str:
    assert "\n" not in message.strip(), message
    return message


# ------------------------------------------------------------------------------ official-layout checkpoints

# (golden family, golden case, registry name, scale, official key)
SOURCES = {
    "esc": ("esc", "esc_x2", "esc", 2, "params_ema"),
    "asid": ("asid", "asid_x2", "asid", 2, ""),
    "agdn": ("agdn", None, "agdn", 2, "params_ema"),  # the real official AGDN_x2.pth
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """label -> (official-layout .pth, the state dict it holds under its official key)."""
    folder = tmp_path_factory.mktemp("pth")
    made = {}
    for label, (family, case, *_ , key) in SOURCES.items():
        if case is None:
            pth = need(AGDN_PTH / "AGDN_x2.pth")
            made[label] = (pth, torch.load(pth, map_location="cpu", weights_only=True)["params_ema"])
            continue
        state = load_golden(family, case).weights
        pth = folder / f"{case}.pth"
        torch.save({key: state} if key else state, pth)
        made[label] = (pth, state)
    return made


def served_entry(site: Site, label: str, checkpoints, path: str | None = None, **changes) -> registry.ModelEntry:
    """The registry entry for `label`, its source moved to the local server (which now serves the file)."""
    family, _, name, scale, _ = SOURCES[label]
    require_family(family)
    pth, _ = checkpoints[label]
    path = path or f"/files/{label}/{pth.name}"
    site.files[path] = pth.read_bytes()
    entry = registry.resolve(name, scale)
    changes = {"url": site.url(path), "sha256": sha256_of(pth), **changes}
    if label == "agdn":  # the package ships agdn x2: another file name, so that the download path is taken
        changes.setdefault("file", "agdn_x2_downloaded.safetensors")
    return dataclasses.replace(entry, **changes)


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


# ------------------------------------------------------------------------------------------- good downloads


@pytest.mark.parametrize("label", list(SOURCES))
def test_download_verifies_converts_caches_and_never_downloads_twice(label, site, cache, checkpoints):
    entry = served_entry(site, label, checkpoints)
    pth, official = checkpoints[label]
    calls = []
    path = resolve_weights(entry, progress=lambda done, total: calls.append((done, total)))

    assert path == cache / entry.file
    assert leftovers(cache) == [entry.file], "only the converted file stays in the cache"
    assert site.count() == 1
    size = pth.stat().st_size
    assert calls and calls[-1] == (size, size)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and all(t == size for _, t in calls)

    meta = metadata_of(path)
    assert meta["model"] == entry.name and meta["scale"] == str(entry.scale) and meta["family"] == SOURCES[label][0]
    assert meta["source_url"] == entry.url and meta["source_file"] == pth.name
    assert meta["source_sha256"] == sha256_of(pth) == entry.sha256
    assert meta["source_checksum"] == "matches the registry"
    assert meta["source_key"] == SOURCES[label][4]
    assert "downloaded_from" not in meta

    model = load_model(entry, path)  # strict: every key, every shape
    loaded = model.state_dict()
    assert loaded.keys() == official.keys()
    assert all(torch.equal(loaded[k], official[k].float()) for k in official)

    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask, "a cached file gets normal permissions, not 0600"

    # present now: neither resolving nor fetching downloads again
    assert resolve_weights(entry) == path and fetch(entry) == path
    assert site.count() == 1
    # unless forced
    assert fetch(entry, force=True) == path and site.count() == 2
    assert leftovers(cache) == [entry.file]


def test_the_official_agdn_checkpoint_converts_its_params_ema_not_params(site, cache, checkpoints):
    entry = served_entry(site, "agdn", checkpoints)
    both = torch.load(checkpoints["agdn"][0], map_location="cpu", weights_only=True)
    assert not all(torch.equal(both["params"][k], both["params_ema"][k]) for k in both["params"])
    converted = read_safetensors(fetch(entry))
    assert all(torch.equal(converted[k], both["params_ema"][k]) for k in both["params_ema"])


def test_a_download_without_a_registry_checksum_is_converted_and_says_so(site, cache, checkpoints):
    entry = served_entry(site, "esc", checkpoints, sha256=None)
    meta = metadata_of(fetch(entry))
    assert meta["source_checksum"] == "no sha256 in the registry"
    assert meta["source_sha256"] == sha256_of(checkpoints["esc"][0])


# ------------------------------------------------------------------------------------------- bad downloads


def test_checksum_mismatch_names_the_url_and_both_sums_and_caches_nothing(site, cache, checkpoints):
    wrong = "0" * 64
    entry = served_entry(site, "asid", checkpoints, sha256=wrong)
    with pytest.raises(WeightsError) as error:
        resolve_weights(entry)
    message = one_line(str(error.value))
    assert entry.url in message and "sha256 mismatch" in message
    assert sha256_of(checkpoints["asid"][0]) in message and wrong in message
    assert leftovers(cache) == [], "no file, no temporary file, no temporary folder"
    assert site.count() == 1


def test_a_transfer_cut_short_is_an_error_and_caches_nothing(site, cache, checkpoints):
    entry = served_entry(site, "esc", checkpoints)
    path = "/files/cut/ESC_DIV2K_X2.pth"
    site.truncated[path] = checkpoints["esc"][0].read_bytes()[:5000]
    entry = dataclasses.replace(entry, url=site.url(path))
    with pytest.raises(WeightsError) as error:
        resolve_weights(entry)
    message = one_line(str(error.value))
    assert message.startswith(entry.url) and "cut short" in message and "5000 of 6000 bytes" in message
    assert leftovers(cache) == []


def test_http_404_is_an_error_and_caches_nothing(site, cache, checkpoints):
    entry = served_entry(site, "asid", checkpoints)
    entry = dataclasses.replace(entry, url=site.url("/files/missing/epoch0_ASID.pth"))
    with pytest.raises(WeightsError) as error:
        resolve_weights(entry)
    message = one_line(str(error.value))
    assert message == f"{entry.url}: download failed (HTTP 404 Not Found)"
    assert leftovers(cache) == []


def test_a_served_file_that_is_not_the_model_is_refused_after_download(site, cache, checkpoints):
    """The right checksum of the wrong network: the conversion check catches it, nothing is cached."""
    entry = served_entry(site, "asid", checkpoints)
    entry = dataclasses.replace(registry.resolve("asid-d8", 2), url=entry.url, sha256=entry.sha256)
    with pytest.raises(WeightsError, match="not asid-d8 x2 weights; .*missing"):
        resolve_weights(entry)
    assert leftovers(cache) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_one_clear_line(cache):
    url = f"http://127.0.0.1:{_free_port()}/AGDN_x4.pth"
    entry = dataclasses.replace(registry.resolve("esc", 4), url=url)
    with pytest.raises(WeightsError) as error:
        resolve_weights(entry)
    assert one_line(str(error.value)) == f"{url}: download failed (Connection refused)"
    assert leftovers(cache) == []


def test_a_server_that_never_answers_times_out(cache, monkeypatch):
    monkeypatch.setenv("UPSCALE_DOWNLOAD_TIMEOUT", "0.5")
    with socket.socket() as silent:  # listens, never accepts, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/ESC_X4.pth"
        entry = dataclasses.replace(registry.resolve("esc", 4), url=url)
        start = time.monotonic()
        with pytest.raises(WeightsError) as error:
            resolve_weights(entry)
        assert time.monotonic() - start < 10
    assert one_line(str(error.value)) == f"{url}: download failed (no answer from the server within 0.5 s)"
    assert leftovers(cache) == []


def test_a_bad_timeout_setting_is_reported(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("UPSCALE_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(WeightsError, match="UPSCALE_DOWNLOAD_TIMEOUT='soon'"):
        download("http://127.0.0.1:9/x.pth", tmp_path / "x.pth", None)


def test_an_unwritable_cache_is_one_clear_line(site, tmp_path, checkpoints, cache, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("UPSCALE_CACHE_DIR", str(blocker / "cache"))
    entry = served_entry(site, "asid", checkpoints)
    with pytest.raises(WeightsError, match=r"cannot write to the weights cache .*UPSCALE_CACHE_DIR"):
        resolve_weights(entry)
    assert site.count() == 0


# ------------------------------------------------------------------------------------------------- offline


@pytest.mark.parametrize("how", ["--offline", "HF_HUB_OFFLINE"])
def test_offline_never_touches_the_network_and_names_the_missing_file(how, site, cache, checkpoints, monkeypatch):
    entry = served_entry(site, "esc", checkpoints)
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = how == "--offline"
    with pytest.raises(WeightsError) as error:
        resolve_weights(entry, offline=offline)
    message = one_line(str(error.value))
    assert message.startswith(f"offline: {entry.file} for esc x2 is not in ") and str(cache) in message
    assert "upscale fetch esc -s 2" in message
    with pytest.raises(WeightsError, match=f"offline: {entry.file} for esc x2 is not in the cache"):
        fetch(entry, offline=offline)
    assert site.count() == 0 and leftovers(cache) == []


# --------------------------------------------------------------------------------------------------- mirror


def test_mirror_maps_official_urls_under_host_and_path(monkeypatch):
    official = registry.resolve("esc", 2).url
    monkeypatch.delenv("UPSCALE_MIRROR", raising=False)
    assert mirrored(official) == official
    monkeypatch.setenv("UPSCALE_MIRROR", "https://mirror.example.org/sr/")
    assert mirrored(official) == (
        "https://mirror.example.org/sr/github.com/dslisleedh/ESC/releases/download/1.0.0/ESC_DIV2K_X2.pth")
    assert mirrored("hf://owner/repo/model.pth") == "hf://owner/repo/model.pth"


def test_a_file_mirror_works_without_any_server(cache, checkpoints, tmp_path, monkeypatch):
    require_family("esc")
    entry = registry.resolve("esc", 2)
    local = tmp_path / "mirror" / "github.com/dslisleedh/ESC/releases/download/1.0.0/ESC_DIV2K_X2.pth"
    local.parent.mkdir(parents=True)
    local.write_bytes(checkpoints["esc"][0].read_bytes())
    monkeypatch.setenv("UPSCALE_MIRROR", (tmp_path / "mirror").as_uri())
    path = resolve_weights(entry)
    meta = metadata_of(path)
    assert meta["source_url"] == entry.url and meta["downloaded_from"] == local.as_uri()
    assert leftovers(cache) == [entry.file]


def _cli(*args, env: dict[str, str]):
    full = {k: v for k, v in os.environ.items()
            if k not in ("UPSCALE_WEIGHTS_DIR", "UPSCALE_MIRROR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    full.update(env)
    return subprocess.run([*upscale_cmd(), *map(str, args)], capture_output=True, text=True, env=full)


def _mirror_path(url: str) -> str:
    return "/" + url.split("://", 1)[1]


def test_cli_fetch_through_a_mirror_end_to_end(site, cache, checkpoints, tmp_path):
    require_family("esc")
    esc2 = registry.resolve("esc", 2)
    asid2 = registry.resolve("asid", 2)
    site.files[_mirror_path(esc2.url)] = checkpoints["esc"][0].read_bytes()
    site.files[_mirror_path(asid2.url)] = checkpoints["asid"][0].read_bytes()
    env = {"UPSCALE_CACHE_DIR": str(cache), "UPSCALE_MIRROR": site.base}

    result = _cli("fetch", "esc", "-s", "2", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"esc x2: {cache / esc2.file}"
    meta = metadata_of(cache / esc2.file)
    assert meta["source_url"] == esc2.url and meta["downloaded_from"] == site.url(_mirror_path(esc2.url))
    assert site.count() == 1

    assert _cli("fetch", "asid", "-s", "2", env=env).returncode == 0
    assert site.count() == 2 and leftovers(cache) == sorted([esc2.file, asid2.file])

    # all scales of esc: x2 is cached (no request), x3 and x4 are not on the mirror (404 each, one line each)
    result = _cli("fetch", "esc", env=env)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("download failed (HTTP 404 Not Found)" in e for e in errors)
    assert f"esc x2: {cache / esc2.file}" in result.stderr
    assert site.count() == 4 and leftovers(cache) == sorted([esc2.file, asid2.file])

    # the fetched weights run, and `models` reports them present
    photo = tmp_path / "photo.png"
    Image.open(EXAMPLE).crop((40, 20, 64, 44)).save(photo)
    out = tmp_path / "out.png"
    result = _cli(photo, "-m", "esc", "-s", "2", "-o", out, env=env)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (48, 48)
    rows = [json.loads(line) for line in _cli("models", "--json", env=env).stdout.splitlines()]
    present = {(r["model"], r["scale"]) for r in rows if r["weights"] and r["weights"].startswith(str(cache))}
    assert present == {("esc", 2), ("asid", 2)}
    assert site.count() == 4


def test_cli_offline_never_touches_the_network(site, cache, checkpoints, tmp_path):
    esc3 = registry.resolve("esc", 3)
    site.files[_mirror_path(esc3.url)] = checkpoints["esc"][0].read_bytes()  # would be found, if asked
    photo = tmp_path / "photo.png"
    Image.open(EXAMPLE).crop((40, 20, 64, 44)).save(photo)
    env = {"UPSCALE_CACHE_DIR": str(cache), "UPSCALE_MIRROR": site.base}
    runs = [
        _cli(photo, "-m", "esc", "-s", "3", "--offline", "-o", tmp_path / "a.png", env=env),
        _cli(photo, "-m", "esc", "-s", "3", "-o", tmp_path / "b.png", env={**env, "HF_HUB_OFFLINE": "1"}),
        _cli("fetch", "esc", "-s", "3", env={**env, "HF_HUB_OFFLINE": "1"}),
    ]
    for result in runs:
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"offline: {esc3.file} for esc x3 is not in" in lines[0], result.stderr
    assert site.count() == 0
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
    assert leftovers(cache) == []


# ------------------------------------------------------------------------------------ Hugging Face hub sources


def test_hub_urls_are_parsed():
    hub = parse_hub_url("hf://owner/repo@v1.0/weights/x2/model.pth")
    assert (hub.repo_id, hub.filename, hub.revision) == ("owner/repo", "weights/x2/model.pth", "v1.0")
    assert parse_hub_url("hf://owner/repo/model.pth").revision is None
    for bad in ("hf://owner/model.pth", "hf://owner/repo/", "https://owner/repo/model.pth", "hf://owner/repo@/m.pth"):
        with pytest.raises(WeightsError, match="expected hf://OWNER/REPO"):
            parse_hub_url(bad)


def test_hub_source_offline_is_one_line_naming_the_file(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = dataclasses.replace(registry.resolve("esc", 2), url="hf://upscale-tests/no-such-repo/ESC_DIV2K_X2.pth")
    with pytest.raises(WeightsError) as error:
        resolve_weights(entry)
    message = one_line(str(error.value))
    assert message.startswith(f"offline: {entry.file} for esc x2 is not in ")
    assert "nor is ESC_DIV2K_X2.pth of upscale-tests/no-such-repo in the Hugging Face cache" in message
    with pytest.raises(WeightsError, match="offline: ESC_DIV2K_X2.pth of upscale-tests/no-such-repo"):
        fetch(entry)
    assert leftovers(cache) == []


HUB_SCRIPT = """
import dataclasses, json, sys
from upscale import registry
from upscale.weights import WeightsError, resolve_weights
name, scale, url, sha = sys.argv[1:5]
entry = dataclasses.replace(registry.resolve(name, int(scale)), url=url, sha256=sha or None)
calls = []
try:
    path = resolve_weights(entry, progress=lambda done, total: calls.append([done, total]))
    print(json.dumps({"path": str(path), "progress": calls}))
except WeightsError as e:
    print(json.dumps({"error": str(e)}))
"""


def _hub_run(site: Site, home: Path, cache: Path, entry_args: list[str], offline: bool = False) -> dict:
    """The hub path in a fresh interpreter: huggingface_hub reads HF_ENDPOINT/HF_HOME when it is imported."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "UPSCALE_")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_ENDPOINT=site.base, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", UPSCALE_CACHE_DIR=str(cache))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", HUB_SCRIPT, *entry_args], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_hub_source_downloads_through_huggingface_hub_then_verifies_and_converts(site, cache, checkpoints, tmp_path):
    require_family("asid")
    pth, state = checkpoints["asid"]
    site.hub["upscale-tests/asid/ASID_X2_DIV2K/epoch0_ASID.pth"] = pth.read_bytes()
    url = "hf://upscale-tests/asid/ASID_X2_DIV2K/epoch0_ASID.pth"
    home = tmp_path / "hf-home"
    entry = registry.resolve("asid", 2)

    got = _hub_run(site, home, cache, ["asid", "2", url, sha256_of(pth)])
    assert got.get("path") == str(cache / entry.file), got
    assert got["progress"] and got["progress"][-1] == [pth.stat().st_size, pth.stat().st_size]
    assert site.count("GET") == 1
    meta = metadata_of(cache / entry.file)
    assert meta["source_url"] == url and meta["source_revision"] == COMMIT
    assert meta["source_checksum"] == "matches the registry" and meta["source_sha256"] == sha256_of(pth)
    converted = read_safetensors(cache / entry.file)
    assert all(torch.equal(converted[k], state[k]) for k in state)
    assert leftovers(cache) == [entry.file]

    # offline, our cache emptied: the file still in the Hugging Face cache converts without a single request
    (cache / entry.file).unlink()
    before = site.count()
    got = _hub_run(site, home, cache, ["asid", "2", url, sha256_of(pth)], offline=True)
    assert got.get("path") == str(cache / entry.file), got
    assert site.count() == before

    # a checksum that does not match the hub file: an error, our cache stays clean
    (cache / entry.file).unlink()
    got = _hub_run(site, home, cache, ["asid", "2", url, "0" * 64])
    assert "sha256 mismatch" in got.get("error", "") and url in got["error"] and "\n" not in got["error"]
    assert leftovers(cache) == []


def test_hub_source_missing_file_and_offline_without_requests(site, cache, tmp_path):
    home = tmp_path / "hf-home"
    url = "hf://upscale-tests/asid/nothing-here.pth"
    got = _hub_run(site, home, cache, ["asid", "2", url, ""], offline=True)
    assert "nothing-here.pth of upscale-tests/asid in the Hugging Face cache" in got["error"]
    assert "\n" not in got["error"] and site.count() == 0

    got = _hub_run(site, home, cache, ["asid", "2", url, ""])
    assert got["error"].startswith(f"{url}: download from the Hugging Face hub failed (")
    assert "\n" not in got["error"] and site.count() >= 1
    assert leftovers(cache) == []


# --------------------------------------------------------------------------------------- conversion details


def test_convert_strips_a_dataparallel_prefix_and_records_provenance(tmp_path, checkpoints):
    pth, state = checkpoints["asid"]
    wrapped = tmp_path / "dp.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, wrapped)
    entry = convert_checkpoint(wrapped, tmp_path / "out.safetensors")
    assert entry.label == "asid x2"
    meta = metadata_of(tmp_path / "out.safetensors")
    assert meta["source_file"] == "dp.pth" and meta["source_url"] == ""
    assert meta["source_checksum"] == "no sha256 in the registry"


def test_an_explicit_key_must_exist_but_the_registry_key_falls_back(tmp_path, checkpoints):
    _, state = checkpoints["asid"]
    flat = tmp_path / "flat.pth"
    torch.save(state, flat)
    with pytest.raises(WeightsError, match=r"has no 'params_ema' entry \(it has: .*\(\+\d+ more\)\)"):
        convert_checkpoint(flat, tmp_path / "a.safetensors", registry.resolve("asid", 2), key="params_ema")
    nested = tmp_path / "nested.pth"
    torch.save({"params": state}, nested)  # the registry says "" (flat) for ASID: the wrapper is still found
    convert_checkpoint(nested, tmp_path / "b.safetensors", registry.resolve("asid", 2))
    assert metadata_of(tmp_path / "b.safetensors")["source_key"] == "params"
    assert not (tmp_path / "a.safetensors").exists()


def test_leftovers_of_killed_downloads_are_cleared_but_not_those_of_running_ones(site, cache, checkpoints):
    entry = served_entry(site, "asid", checkpoints)
    cache.mkdir()
    old_dir, old_part = cache / ".download-killed", cache / f".{entry.file}.killed.part"
    fresh = cache / ".download-running"
    for folder in (old_dir, fresh):
        folder.mkdir()
        (folder / "epoch0_ASID.pth").write_bytes(b"partial")
    old_part.write_bytes(b"partial")
    day_ago = time.time() - 25 * 3600
    for path in (old_dir, old_part):
        os.utime(path, (day_ago, day_ago))
    resolve_weights(entry)
    assert leftovers(cache) == sorted([".download-running", ".download-running/epoch0_ASID.pth", entry.file])
