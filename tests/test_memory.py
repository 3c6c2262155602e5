"""The memory estimates the engine plans tiles with are measured figures: the real peak of a forward pass, at two
sizes and in two precisions per family, must stay under the family's `memory_estimate`.

Each family is measured in a fresh process (`PeakMemory`: the RSS high-water mark on the CPU, reset before each
case), after a small warm-up forward so that one-time costs (kernel build, thread pools) are not counted."""

import json
import subprocess
import sys

import pytest

from upscale.memory import PeakMemory

MEASURE = r"""
import json, sys, torch
from upscale import registry
from upscale.engine import Upscaler
from upscale.memory import PeakMemory
from upscale.weights import build_model

torch.manual_seed(0)
name, scale = sys.argv[1], int(sys.argv[2])
entry = registry.resolve(name, scale)
rows = []
for precision in ("fp32", "bf16"):
    up = Upscaler(entry, build_model(entry).eval().requires_grad_(False), protocol="whole", precision=precision)
    up.run(torch.rand(1, 3, 32, 32))  # warm-up
    for h, w in ((64, 64), (128, 96)):
        x = torch.rand(1, 3, h, w)
        with PeakMemory("cpu") as peak:
            up.run(x)
        rows.append({"precision": precision, "size": [h, w], "peak": peak.extra,
                     "estimate": up.memory_estimate().bytes_for(h * w)})
print(json.dumps(rows))
"""


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("name,scale", [("agdn", 4), ("esc-light", 4), ("esc-real", 4), ("asid", 4)])
def test_peak_memory_of_a_forward_stays_under_the_family_estimate(name, scale):
    with PeakMemory("cpu") as probe:
        pass
    if probe.extra is None:
        pytest.skip("this system cannot reset the process's peak memory (/proc/self/clear_refs)")
    result = subprocess.run([sys.executable, "-c", MEASURE, name, str(scale)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    print(name, [(r["precision"], r["size"], round(r["peak"] / 2**20, 1), round(r["estimate"] / 2**20, 1))
                 for r in rows])
    over = [r for r in rows if r["peak"] > r["estimate"]]
    assert not over, f"{name} x{scale}: peak above the estimate: {over}"
    # and the estimate is a measurement, not a blanket: within 4x of the peak at the larger size
    for r in rows:
        if r["size"] == [128, 96]:
            assert r["estimate"] <= 4 * r["peak"], r
