"""The capture layer (``hiddenlens.probes``): site names, hooks, reductions and the activation store."""
from .capture import ActivationCache, Capture, HookNotFiredError, NonFiniteActivationError, capture
from .reducers import RunningStats
from .sites import Site, UnknownSiteError, all_site_names, resolve_sites

__all__ = ["ActivationCache", "Capture", "HookNotFiredError", "NonFiniteActivationError", "capture",
           "RunningStats", "Site", "UnknownSiteError", "all_site_names", "resolve_sites"]
