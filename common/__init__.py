"""Helpers every layer may use (``hiddenlens.common``): the user-error base, atomic files, locked and committed
output folders, and shared statistics.

The bottom of the import stack: nothing here imports another ``hiddenlens`` subpackage.
"""
from .errors import DamagedFileError, FolderExistsError, FolderLockedError, NonFiniteError, UserError
from .files import atomic_path, write_json, write_text
from .folders import check_free, committed_folder, locked
from .stats import auroc, bootstrap_ci, entropy, js_divergence, kl_divergence, log_probs, markdown_table, wilson_ci

__all__ = ["UserError", "DamagedFileError", "FolderExistsError", "FolderLockedError", "NonFiniteError",
           "check_free", "committed_folder", "locked", "atomic_path", "write_json", "write_text", "auroc",
           "bootstrap_ci", "entropy", "js_divergence", "kl_divergence", "log_probs", "markdown_table", "wilson_ci"]
