"""Interventions (``hiddenlens.interventions``): changes of the forward pass, all written through ``hl.edit``.

* :mod:`.steer` -- steering during generation (RepE / ITI additions; TruthPrInt-style conditional steering).
* :mod:`.replace` -- semantic-leakage token replacement (Follow-the-Flow, transferred to causal LMs).
* :mod:`.iterate` / :mod:`.decider` -- latent iteration (Coconut continuous thoughts, Think-at-Hard).
* :mod:`.patching` -- activation and attribution patching, zero / mean / resample ablations.
"""
from .decider import (EntropyDecider, MaskDecider, MLPDecider, MLPDeciderConfig, load_decider, save_decider,
                      train_mlp_decider)
from .iterate import continuous_thoughts, first_pass, iterate_from, iterate_teacher_forced
from .patching import PromptPair, ablation_op, activation_patching, attribution_patching, compare
from .replace import (compare_replacement, generate_replaced, isolated_states, locate_span, replacement,
                      replacement_sites, run_replaced)
from .steer import SteerOutput, Steering, steer_generate

__all__ = ["EntropyDecider", "MaskDecider", "MLPDecider", "MLPDeciderConfig", "load_decider", "save_decider",
           "train_mlp_decider", "PromptPair", "ablation_op", "activation_patching", "attribution_patching",
           "compare", "continuous_thoughts", "first_pass", "iterate_from", "iterate_teacher_forced",
           "compare_replacement", "generate_replaced", "isolated_states", "locate_span", "replacement",
           "replacement_sites", "run_replaced", "SteerOutput", "Steering", "steer_generate"]
