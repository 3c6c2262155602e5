"""The model zoo in weights.toml and name resolution."""

import pytest

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
