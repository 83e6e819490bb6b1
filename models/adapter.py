"""Architecture adapter: where the embedding, blocks, attention, MLP, final norm and unembedding live.

Discovery is automatic for the Llama / Mistral / Qwen2 / Gemma family, GPT-2 and GPT-NeoX (and anything laid
out like them). For anything else pass explicit module paths, e.g.
``load_model(spec, adapter_overrides={"blocks": "model.decoder.layers", "final_norm": "model.decoder.norm"})``.
Paths in overrides are dotted attribute paths from the top model; per-block paths (``attn``, ``mlp``, ``q_proj``,
``k_proj``, ``v_proj``, ``qkv_proj``, ``o_proj``, ``mlp_in``, ``mlp_out_proj``, ``mlp_norm``) are relative to a block.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

_BLOCK_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "layers", "blocks")
_FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm",
                "ln_f", "norm", "final_norm", "ln_final")
_ATTN = ("self_attn", "attn", "attention")
_Q, _K, _V = ("q_proj",), ("k_proj",), ("v_proj",)
_QKV_FUSED = ("c_attn", "query_key_value", "qkv_proj", "Wqkv")
_O = ("o_proj", "c_proj", "dense", "out_proj")
_MLP = ("mlp", "feed_forward", "ffn")
_MLP_IN = ("gate_proj", "c_fc", "dense_h_to_4h", "fc1", "up_proj")
_MLP_OUT = ("down_proj", "c_proj", "dense_4h_to_h", "fc2")
# The module whose *input* is resid_mid (the pre-MLP norm) in sequential-residual blocks.
_MLP_NORM = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2")


class UnknownArchitectureError(ValueError):
    """The model's layout could not be discovered; the message names the override to pass."""


def get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _find(root: nn.Module, names, what: str, overrides: dict, key: str):
    if key in overrides:
        try:
            return overrides[key], get_path(root, overrides[key])
        except (AttributeError, IndexError) as exc:
            raise UnknownArchitectureError(f"adapter override {key}={overrides[key]!r} does not exist: {exc}") from exc
    for name in names:
        try:
            return name, get_path(root, name)
        except (AttributeError, IndexError):
            continue
    return None, None


@dataclass
class ArchitectureAdapter:
    """Module paths and sizes of one decoder-only model.

    All ``*_path`` fields of a block are relative to that block. ``qkv`` is ``"separate"`` (q/k/v projections),
    ``"gpt2"`` (one fused Conv1D, [q|k|v] along the last dim) or ``"neox"`` (fused, interleaved per head).
    """

    family: str
    blocks_path: str
    final_norm_path: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    d_mlp: int
    d_vocab: int
    attn_path: str
    mlp_path: str
    qkv: str
    q_path: str | None
    k_path: str | None
    v_path: str | None
    qkv_path: str | None
    o_path: str
    mlp_in_path: str
    mlp_out_proj_path: str
    mlp_norm_path: str | None
    attn_out_path: str | None = None  # module whose output is what the residual adds (Gemma2/3: post-attn norm)
    mlp_out_path: str | None = None
    parallel_residual: bool = False
    unavailable: dict = field(default_factory=dict)

    # ---- module accessors -------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_path(model, self.blocks_path)

    def block(self, model: nn.Module, i: int) -> nn.Module:
        return self.blocks(model)[i]

    def sub(self, model: nn.Module, i: int, path: str) -> nn.Module:
        return get_path(self.block(model, i), path)

    def embedding(self, model: nn.Module) -> nn.Module:
        return model.get_input_embeddings()

    def unembedding(self, model: nn.Module) -> nn.Module:
        return model.get_output_embeddings()

    def final_norm(self, model: nn.Module) -> nn.Module:
        return get_path(model, self.final_norm_path)

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "unavailable"} | {
            "unavailable_sites": dict(self.unavailable)}


def _cfg(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def discover_adapter(model: nn.Module, overrides: dict | None = None) -> ArchitectureAdapter:
    """Find the layout of ``model`` (a transformers ``*ForCausalLM`` or anything shaped like one)."""
    overrides = dict(overrides or {})
    config = getattr(model, "config", None)
    blocks_path, blocks = _find(model, _BLOCK_LISTS, "blocks", overrides, "blocks")
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise UnknownArchitectureError(
            f"cannot find the decoder block list of {type(model).__name__}; pass "
            "load_model(..., adapter_overrides={'blocks': 'path.to.layers', 'final_norm': 'path.to.norm'})")
    norm_path, _ = _find(model, _FINAL_NORMS, "final norm", overrides, "final_norm")
    if norm_path is None:
        raise UnknownArchitectureError(
            f"cannot find the final norm of {type(model).__name__}; pass adapter_overrides={{'final_norm': '...'}}")
    block0 = blocks[0]

    def local(names, key, required=True):
        path, mod = _find(block0, names, key, overrides, key)
        if path is None and required:
            raise UnknownArchitectureError(
                f"cannot find the {key} module in {type(block0).__name__} (children: "
                f"{[n for n, _ in block0.named_children()]}); pass adapter_overrides={{'{key}': 'name'}}")
        return path, mod

    attn_path, attn = local(_ATTN, "attn")
    mlp_path, mlp = local(_MLP, "mlp")
    q_path = k_path = v_path = qkv_path = None
    if all(hasattr(attn, n[0]) for n in (_Q, _K, _V)) or "q_proj" in overrides:
        qkv = "separate"
        q_path, k_path, v_path = (overrides.get(k, f"{attn_path}.{n[0]}") for k, n in
                                  (("q_proj", _Q), ("k_proj", _K), ("v_proj", _V)))
    else:
        fused = overrides.get("qkv_proj") or next((f"{attn_path}.{n}" for n in _QKV_FUSED if hasattr(attn, n)), None)
        if fused is None:
            raise UnknownArchitectureError("cannot find the q/k/v projections; pass adapter_overrides with "
                                           "'q_proj', 'k_proj', 'v_proj' (or 'qkv_proj') paths relative to a block")
        qkv_path = fused
        qkv = "gpt2" if fused.endswith("c_attn") else "neox"
    o_path = overrides.get("o_proj") or next((f"{attn_path}.{n}" for n in _O if hasattr(attn, n)), None)
    mlp_in = overrides.get("mlp_in") or next((f"{mlp_path}.{n}" for n in _MLP_IN if hasattr(mlp, n)), None)
    mlp_out = overrides.get("mlp_out_proj") or next((f"{mlp_path}.{n}" for n in _MLP_OUT if hasattr(mlp, n)), None)
    if o_path is None or mlp_in is None or mlp_out is None:
        raise UnknownArchitectureError("cannot find the attention output projection or the MLP projections; pass "
                                       "adapter_overrides={'o_proj': ..., 'mlp_in': ..., 'mlp_out_proj': ...}")
    family = getattr(config, "model_type", type(model).__name__)
    parallel = bool(_cfg(config, "use_parallel_residual", "parallel_attn", default=False))
    unavailable = {}
    mlp_norm_path = overrides.get("mlp_norm")
    attn_out_path = mlp_out_path = None
    if hasattr(block0, "pre_feedforward_layernorm") and hasattr(block0, "post_feedforward_layernorm"):
        # Gemma2/3 sandwich norms: the residual adds the *normed* sub-block outputs.
        mlp_norm_path = mlp_norm_path or "pre_feedforward_layernorm"
        attn_out_path, mlp_out_path = "post_attention_layernorm", "post_feedforward_layernorm"
    elif mlp_norm_path is None and not parallel:
        mlp_norm_path = next((n for n in _MLP_NORM if hasattr(block0, n)), None)
    if parallel:
        mlp_norm_path = None
        unavailable["resid_mid"] = ("this model uses a parallel residual (attention and MLP both read resid_pre), "
                                    "so there is no resid_mid; use resid_pre, attn.out and mlp.out")
    elif mlp_norm_path is None:
        unavailable["resid_mid"] = "no pre-MLP norm was found; pass adapter_overrides={'mlp_norm': 'name'}"

    n_heads = int(_cfg(config, "num_attention_heads", "n_head"))
    d_model = int(_cfg(config, "hidden_size", "n_embd", "d_model"))
    head_dim = int(_cfg(config, "head_dim", default=d_model // n_heads))
    n_kv = int(_cfg(config, "num_key_value_heads", default=n_heads))
    d_mlp = int(_cfg(config, "intermediate_size", "n_inner", default=None) or 4 * d_model)
    return ArchitectureAdapter(
        family=family, blocks_path=blocks_path, final_norm_path=norm_path, n_layers=len(blocks), n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim, d_model=d_model, d_mlp=d_mlp,
        d_vocab=int(model.get_output_embeddings().weight.shape[0]), attn_path=attn_path, mlp_path=mlp_path,
        qkv=qkv, q_path=q_path, k_path=k_path, v_path=v_path, qkv_path=qkv_path, o_path=o_path,
        mlp_in_path=mlp_in, mlp_out_proj_path=mlp_out, mlp_norm_path=mlp_norm_path, attn_out_path=attn_out_path,
        mlp_out_path=mlp_out_path, parallel_residual=parallel, unavailable=unavailable)
