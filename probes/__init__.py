"""The hook layer (``hiddenlens.probes``): site names, the model handle and its backends, reads (``capture``) and
edits (``edit``) addressed by site name, directions, reductions and the activation store.

Hooks live only here (in :mod:`hiddenlens.probes.backends`); every analysis and intervention reads and writes
through :func:`capture` and :func:`edit`.
"""
from .backends import BACKENDS, Backend, BackendError
from .capture import ActivationCache, Capture, HookNotFiredError, NonFiniteActivationError, capture
from .direction import Direction, load_directions, save_directions
from .edit import Add, Apply, Edit, EditNotAppliedError, Op, Patch, Scale, Set, Where, Zero, edit
from .handle import Batch, GenerationOutput, ModelHandle, RunOutput, load_model
from .reducers import RunningStats
from .sites import Site, UnknownSiteError, all_site_names, parse_layers, parse_site, resolve_sites

__all__ = ["BACKENDS", "Backend", "BackendError", "ActivationCache", "Capture", "HookNotFiredError",
           "NonFiniteActivationError", "capture", "Direction", "load_directions", "save_directions", "Add", "Apply",
           "Edit", "EditNotAppliedError", "Op", "Patch", "Scale", "Set", "Where", "Zero", "edit", "Batch",
           "GenerationOutput", "ModelHandle", "RunOutput", "load_model", "RunningStats", "Site", "UnknownSiteError",
           "all_site_names", "parse_layers", "parse_site", "resolve_sites"]
