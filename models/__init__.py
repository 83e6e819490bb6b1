"""Model loading and architecture adapters (``hiddenlens.models``)."""
from .adapter import ArchitectureAdapter, UnknownArchitectureError, discover_adapter
from .embedded import EMBEDDED_SPEC
from .handle import Batch, GenerationOutput, ModelHandle, RunOutput
from .loading import load_model, pick_device, pick_dtype, register_directory_loader

__all__ = ["ArchitectureAdapter", "UnknownArchitectureError", "discover_adapter", "EMBEDDED_SPEC", "Batch",
           "GenerationOutput", "ModelHandle", "RunOutput", "load_model", "pick_device", "pick_dtype",
           "register_directory_loader"]
