"""`scripts/device-check --cpu`: the one-shot GPU check runs on the CPU at small sizes, prints its table (golden,
PSNR, out-of-memory, MP/s, folder) and writes its JSON, so that whoever has a GPU gets a script known to work."""

import json
import subprocess
import sys

from conftest import REPO, SHARED


def test_device_check_runs_on_the_cpu_and_reports(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "device-check"), "--cpu", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = {r["check"] for r in report["rows"]}
    assert {"oom", "speed", "folder"} <= checks
    if (SHARED / "golden").is_dir():
        assert {"golden", "set5"} <= checks
        set5 = next(r for r in report["rows"] if r["check"] == "set5")
        assert abs(set5["psnr"] - 38.2118) <= 0.001
    assert not [r for r in report["rows"] if r["ok"] is False]
    assert "upscale device check" in result.stdout and "MP/s" in result.stdout
    speed = [r for r in report["rows"] if r["check"] == "speed"]
    assert {r["setting"].split()[0] for r in speed} == {"agdn", "esc", "asid"}
    assert all(r["output_mp_per_s"] > 0 and r["protocol"] in ("reference", "tiled") for r in speed)
