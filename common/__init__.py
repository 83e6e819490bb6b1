"""Helpers every layer may use (``hiddenlens.common``): atomic file writes and shared statistics.

The bottom of the import stack: nothing here imports another ``hiddenlens`` subpackage.
"""
from .files import atomic_path, write_json, write_text
from .stats import auroc, bootstrap_ci, entropy, js_divergence, kl_divergence, log_probs, markdown_table, wilson_ci

__all__ = ["atomic_path", "write_json", "write_text", "auroc", "bootstrap_ci", "entropy", "js_divergence",
           "kl_divergence", "log_probs", "markdown_table", "wilson_ci"]
