"""Analyses (``hiddenlens.analyses``): read-only measurements, every one reading through ``hl.capture``.

* :mod:`.intention` / :mod:`.regimes` -- intention entropy, effective dimensionality, recoverability; the regime run.
* :mod:`.sinks` -- attention sinks, value drains, residual peaks, active-dormant heads.
* :mod:`.dynamics` / :mod:`.tuned_lens` -- logit and tuned lens, trajectory statistics, belief states.
* :mod:`.dla` -- direct logit attribution (embedding, heads, MLPs; final-norm scale frozen).
* :mod:`.truth` -- truthful directions (mass-mean, probe, RepE, ITI heads) and per-token scores.
* :mod:`.leakage`, :mod:`.iteration`, :mod:`.bb_metrics`, :mod:`.checkpoints` -- the measurement halves of the
  leakage, iteration and Bigram-Backcopy studies, and checkpoint sweeps.

The paper studies that combine these with interventions and write reports live in :mod:`hiddenlens.studies`.
"""
from .checkpoints import over_checkpoints, plot_over_checkpoints
from .dla import direct_logit_attribution
from .dynamics import (belief_state_predictability, dynamics_summary, lens_logits, logit_lens, residual_trajectory,
                       token_dynamics)
from .intention import effective_dimensionality, intention_entropy, recoverability
from .regimes import run_regimes
from .sinks import head_ablation, head_pattern, intervene_head, sink_analysis
from .truth import fit_direction, fit_truth, token_scores
from .tuned_lens import TunedLens, train_tuned_lens

__all__ = ["over_checkpoints", "plot_over_checkpoints", "belief_state_predictability", "dynamics_summary",
           "direct_logit_attribution", "lens_logits", "logit_lens", "residual_trajectory", "token_dynamics", "effective_dimensionality",
           "intention_entropy", "recoverability", "run_regimes", "head_ablation", "head_pattern", "intervene_head",
           "sink_analysis", "fit_direction", "fit_truth", "token_scores", "TunedLens", "train_tuned_lens"]
