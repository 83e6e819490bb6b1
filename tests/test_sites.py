import pytest

from hiddenlens.probes.sites import UnknownSiteError, all_site_names, resolve_sites


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
    with pytest.raises(UnknownSiteError, match="cannot read the layer part"):
        resolve_sites("blocks.x.resid_post", 4)
    with pytest.raises(UnknownSiteError, match="parallel"):
        resolve_sites("blocks.0.resid_mid", 4, {"resid_mid": "parallel residual"})
    with pytest.raises(ValueError, match="no sites"):
        resolve_sites([], 4)


def test_all_site_names_counts():
    assert len(all_site_names(30)) == 3 + 30 * 13
