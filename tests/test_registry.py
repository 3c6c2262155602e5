"""The model zoo in weights.toml and name resolution."""

import pytest
import torch

from upscale import registry
from upscale.registry import UnknownModelError

PUBLISHED = {
    "agdn": [2, 3, 4], "agdn-s": [4],
    "esc-light": [2, 3, 4], "esc": [2, 3, 4], "esc-dflip": [2, 3, 4], "esc-fp": [2, 3, 4], "esc-xl": [2, 3, 4],
    "esc-real": [4],
    "asid": [2, 3, 4], "asid-d8": [2, 3, 4],
}


def test_every_published_variant_and_scale_is_listed():
    assert {n: registry.scales_of(n) for n in registry.variant_names()} == PUBLISHED


def test_entries_carry_source_licence_paper_and_key():
    for e in registry.all_entries():
        assert e.family in ("agdn", "esc", "asid") and e.params > 0 and e.file.endswith(".safetensors")
        assert e.license and e.paper and e.repository
        if e.name != "agdn-s":  # AGDN-S has no published checkpoint
            assert e.url.startswith("https://github.com/")
        assert e.key == ("" if e.family == "asid" else "params_ema")
        if e.family == "agdn" and e.url:
            assert len(e.sha256) == 64


def test_resolve_defaults_and_aliases():
    assert registry.resolve().label == "agdn x4"
    assert registry.resolve("ESC_XL", 2).label == "esc-xl x2"
    assert registry.resolve("esc-real").scale == 4
    assert registry.resolve("asid-d8", 3).hparams["groups"] == 8


def test_unknown_model_lists_the_choices():
    with pytest.raises(UnknownModelError, match="unknown model 'agdn-xxl'; choose one of: agdn, agdn-s, esc-light"):
        registry.resolve("agdn-xxl")


def test_wrong_scale_lists_the_valid_scales():
    with pytest.raises(UnknownModelError, match="'esc-real' has no x2 weights; valid scales: x4"):
        registry.resolve("esc-real", 2)


@pytest.mark.parametrize("entry", registry.all_entries(), ids=lambda e: e.label)
def test_every_zoo_entry_builds_counts_detects_and_tiles(entry):
    # the contract every family keeps, checked for every entry of weights.toml (built on the meta device)
    from upscale.models import get_architecture
    from upscale.weights import build_model, detect

    with torch.device("meta"):
        model = build_model(entry)
    state = model.state_dict()
    assert sum(v.numel() for v in state.values()) == entry.params
    found = detect(state)
    same_shape = [e for e in registry.all_entries() if (e.family, e.scale, dict(e.hparams)) ==
                  (entry.family, entry.scale, dict(entry.hparams))]
    assert found == same_shape[0]  # the first of identical shapes (ESC DIV2K and DFLIP weights look alike)
    spec = get_architecture(entry.family).tiling_spec(model)
    assert spec.local_mode in ("placement", "blocks") and spec.alignment >= 1 and spec.pad_multiple >= 1
    assert (spec.halo >= 1) if spec.local_mode == "placement" else (spec.block > spec.block_overlap >= 0)
