import pytest

from hiddenlens.probes.sites import Site, UnknownSiteError, all_site_names, parse_layers, parse_site, resolve_sites


def names(patterns, n=4, unavailable=None):
    return [s.name for s in resolve_sites(patterns, n, unavailable)]


def test_globs_ranges_lists_and_order():
    assert names("blocks.*.resid_post") == [f"blocks.{i}.resid_post" for i in range(4)]
    assert names("blocks.1-2.attn.pattern") == ["blocks.1.attn.pattern", "blocks.2.attn.pattern"]
    assert names("blocks.0,3.mlp.out") == ["blocks.0.mlp.out", "blocks.3.mlp.out"]
    assert names("blocks.-1.resid_pre") == ["blocks.3.resid_pre"]
    # forward order: embed first, then per block in execution order, then final_norm and logits
    assert names(["logits", "blocks.1.resid_post", "embed", "blocks.1.resid_pre", "final_norm"]) == [
        "embed", "blocks.1.resid_pre", "blocks.1.resid_post", "final_norm", "logits"]
    assert names(["blocks.1.resid_post", "blocks.1.resid_post"]) == ["blocks.1.resid_post"]


def test_transformer_lens_aliases():
    assert names(["blocks.2.hook_resid_post", "blocks.2.attn.hook_pattern", "hook_embed",
                  "ln_final.hook_normalized", "blocks.0.mlp.hook_post"]) == [
        "embed", "blocks.0.mlp.post", "blocks.2.attn.pattern", "blocks.2.resid_post", "final_norm"]


def test_unknown_site_lists_closest_names():
    with pytest.raises(UnknownSiteError, match="closest valid names: blocks.1.resid_post"):
        resolve_sites("blocks.1.resid_pots", 4)
    with pytest.raises(UnknownSiteError, match="out of range.*4 blocks"):
        resolve_sites("blocks.7.resid_post", 4)
    with pytest.raises(UnknownSiteError, match="cannot read 'x'"):
        resolve_sites("blocks.x.resid_post", 4)
    with pytest.raises(UnknownSiteError, match="parallel"):
        resolve_sites("blocks.0.resid_mid", 4, {"resid_mid": "parallel residual"})
    with pytest.raises(ValueError, match="no sites"):
        resolve_sites([], 4)


def test_all_site_names_counts():
    assert len(all_site_names(30)) == 3 + 30 * 13


def test_parse_layers_is_the_one_layer_parser():
    assert parse_layers("3", 8) == [3]
    assert parse_layers("3,5-7", 8) == [3, 5, 6, 7]
    assert parse_layers("-1", 8) == [7]
    assert parse_layers("2--1", 8) == list(range(2, 8))
    assert parse_layers("*", 4) == [0, 1, 2, 3]
    assert parse_layers([1, 1, 0], 4) == [0, 1]
    assert parse_layers(2, 4) == [2]
    with pytest.raises(ValueError, match="reversed"):
        parse_layers("7-3", 8)
    with pytest.raises(UnknownSiteError, match="reversed"):
        resolve_sites("blocks.3-1.resid_post", 8)  # a reversed range is an error, never an empty set
    with pytest.raises(ValueError, match="--layers: layer 8 .* out of range"):
        parse_layers("8", 8, what="--layers")
    for bad in ("", "1,,2", "a", "1-", True):
        with pytest.raises(ValueError):
            parse_layers(bad, 8)


def test_parse_site_without_a_model():
    assert parse_site("blocks.12.resid_post") == Site(12, "resid_post")
    assert parse_site("blocks.3.hook_resid_post") == Site(3, "resid_post")
    assert parse_site("embed") == Site(None, "embed")
    with pytest.raises(UnknownSiteError, match="one site name"):
        parse_site("blocks.*.resid_post")
