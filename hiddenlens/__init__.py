"""hiddenlens: look inside language models and change what they do.

    import hiddenlens as hl
    handle = hl.load_model()                         # the embedded SmolLM2-135M-Instruct, offline
    logits, cache = handle.run_with_cache(["The capital of France is"], "blocks.*.resid_post")
    cache["blocks.12.resid_post"].shape              # [1, 6, 576]
    with hl.edit(handle, {"blocks.6.resid_post": hl.Add(v)}, positions="last"):
        handle.generate(["The capital of France is"])
"""
from hiddenlens.probes import (BACKENDS, ActivationCache, Add, Apply, BackendError, Direction, Edit,
                               EditNotAppliedError, HookNotFiredError, ModelHandle, Patch, Scale, Set,
                               UnknownSiteError, Zero, capture, edit, load_directions, load_model, parse_layers,
                               save_directions)

__version__ = "0.1.0"
__all__ = ["BACKENDS", "ActivationCache", "Add", "Apply", "BackendError", "Direction", "Edit", "EditNotAppliedError",
           "HookNotFiredError", "ModelHandle", "Patch", "Scale", "Set", "UnknownSiteError", "Zero", "capture", "edit",
           "load_directions", "load_model", "parse_layers", "save_directions", "__version__"]
