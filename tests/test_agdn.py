"""AGDN / AGDN-S against the official outputs (golden fixtures) and the spec's parameter counts."""

import pytest
import torch

from conftest import assert_matches_golden, golden_case_names, load_golden
from upscale import registry
from upscale.models import get_architecture
from upscale.models.agdn import tlc_origins

ARCH = get_architecture("agdn")
SPEC_PARAMS = {("agdn", 2): 280_530, ("agdn", 3): 286_215, ("agdn", 4): 294_174, ("agdn-s", 4): 69_272}


def _variant(case) -> str:
    return "agdn-s" if case.meta["variant"] == "AGDN_S" or "_s_" in case.name else "agdn"


def _model(case, tlc: bool):
    entry = registry.resolve(_variant(case), case.meta["scale"])
    hparams = dict(entry.hparams, tlc_window=entry.hparams["tlc_window"] if tlc else None)
    model = ARCH.build(entry.name, entry.scale, hparams)
    model.load_state_dict(case.weights, strict=True)
    return model


@pytest.mark.parametrize("name", golden_case_names("agdn") or ["<missing>"])
def test_matches_official_outputs(name):
    case = load_golden("agdn", name)
    io = case.io
    with torch.inference_mode():
        if "sr_raw" in io:  # TLC off: attention global over the whole input
            assert_matches_golden(_model(case, tlc=False)(io["lr"]), io["sr_raw"], case.tolerance, f"{name} sr_raw")
        model = _model(case, tlc=True)
        if "sr_raw_tlc" in io:
            assert_matches_golden(model(io["lr"]), io["sr_raw_tlc"], case.tolerance, f"{name} sr_raw_tlc")
        assert_matches_golden(ARCH.reference_forward(model, io["lr_protocol"]), io["sr_protocol"],
                              case.tolerance, f"{name} sr_protocol")


@pytest.mark.parametrize("variant,scale", sorted(SPEC_PARAMS))
def test_parameter_count_equals_spec(variant, scale):
    entry = registry.resolve(variant, scale)
    model = ARCH.build(variant, scale, entry.hparams)
    n = sum(p.numel() for p in model.state_dict().values())
    assert n == SPEC_PARAMS[variant, scale] == entry.params
    assert len(model.state_dict()) == (492 if variant == "agdn" else 285)


@pytest.mark.parametrize("size,expected", [(44, [0]), (57, [0, 9]), (60, [0, 12]), (85, [0, 37]),
                                           (101, [0, 27, 53]), (117, [0, 35, 69]), (130, [0, 41, 82]),
                                           (128, [0, 40, 80]), (256, [0, 42, 84, 126, 168, 208])])
def test_tlc_window_origins_follow_the_official_grid(size, expected):
    assert tlc_origins(size, 48) == expected


def test_detect_recognises_agdn_weights():
    for name in golden_case_names("agdn"):
        case = load_golden("agdn", name)
        assert ARCH.detect(case.weights) == (_variant(case), case.meta["scale"])
    assert ARCH.detect({"foo": torch.zeros(1)}) is None


def test_batch_of_different_images_equals_single_runs():
    entry = registry.resolve("agdn", 2)
    model = ARCH.build("agdn", 2, entry.hparams)
    torch.manual_seed(0)
    x = torch.rand(3, 3, 40, 52)
    with torch.inference_mode():
        batched = model(x)
        for i in range(3):
            assert torch.allclose(batched[i : i + 1], model(x[i : i + 1]), atol=1e-5)
