"""hiddenlens: look inside language models and change what they do.

    import hiddenlens as hl
    handle = hl.load_model()                         # the embedded SmolLM2-135M-Instruct, offline
    with hl.capture(handle, "blocks.*.resid_post", positions="last") as cache:
        handle.run(["The capital of France is"])
    cache["blocks.12.resid_post"].shape              # [1, 1, 576]
"""
from hiddenlens.models import ModelHandle, load_model
from hiddenlens.probes import ActivationCache, HookNotFiredError, UnknownSiteError, capture

__version__ = "0.1.0"
__all__ = ["ModelHandle", "load_model", "ActivationCache", "HookNotFiredError", "UnknownSiteError", "capture",
           "__version__"]
