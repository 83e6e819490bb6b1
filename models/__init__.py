"""Models (``hiddenlens.models``): loading weights and tokenizers, architecture adapters, tiny and embedded models.

The bottom of the model stack: nothing here imports the hook layer (``hiddenlens.probes``) or anything above it.
"""
from .adapter import ArchitectureAdapter, UnknownArchitectureError, discover_adapter
from .embedded import EMBEDDED_SPEC
from .loading import LoadedModel, load_parts, pick_device, pick_dtype, register_directory_loader

__all__ = ["ArchitectureAdapter", "UnknownArchitectureError", "discover_adapter", "EMBEDDED_SPEC", "LoadedModel",
           "load_parts", "pick_device", "pick_dtype", "register_directory_loader"]
