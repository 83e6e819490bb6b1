"""The latent-state dynamics study (``hiddenlens analyze dynamics``): per-layer logit / tuned-lens statistics,
geometry, token dynamics and belief-state predictability over a prompt set, as one tidy table over checkpoints.

The computations are :mod:`hiddenlens.analyses.dynamics` (and :mod:`hiddenlens.analyses.tuned_lens`,
:mod:`hiddenlens.analyses.checkpoints`); this module runs them from a :class:`DynamicsConfig` and keeps the result
(:class:`Result`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar

import pandas as pd

from hiddenlens.analyses.checkpoints import (RayHandleError, check_ray_sweep, checkpoint_labels, map_checkpoints,
                                             plot_over_checkpoints, stack_checkpoints)
from hiddenlens.analyses.dynamics import (belief_state_predictability, dynamics_shares, dynamics_summary, logit_lens,
                                          residual_trajectory, token_dynamics)
from hiddenlens.analyses.tuned_lens import TunedLens
from hiddenlens.common.stats import markdown_table
from hiddenlens.models.tiny import offline_prose

from .report import PREPEND_BOS, ModelSpec, StudyResult

STUDY = "dynamics"


def prompt_set(prompts_file: str | Path | None, n_prompts: int, chars: int, skip: int = 0) -> list[str]:
    """Prompts from a file (.txt one per line, .jsonl with 'text'), at most ``n_prompts``, or ``n_prompts``
    chunks of ``chars`` characters of the offline prose starting at character ``skip``."""
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist")
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        texts = [json.loads(ln)["text"] for ln in lines] if path.suffix == ".jsonl" else lines
        if not texts:
            raise ValueError(f"prompts file {path} holds no prompts")
        return texts[:n_prompts]
    text = offline_prose()
    return [text[i:i + chars] for i in range(skip, skip + n_prompts * chars, chars)]


@dataclass
class DynamicsConfig(ModelSpec):
    """``checkpoints`` run after ``model``; prompts from ``prompts_file`` or ``n_prompts`` chunks of ``chars``
    characters of offline prose; an optional tuned ``lens`` (.safetensors); ``belief`` adds belief-state R^2;
    ``example`` / ``target``: the prompt and token of the per-position lens table; ``add_bos``: prepend the
    tokenizer's BOS to every prompt (the one convention, :data:`~hiddenlens.studies.report.PREPEND_BOS`)."""

    checkpoints: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    n_prompts: int = 32
    chars: int = 400
    batch_size: int = 8
    lens: str | None = None
    belief: bool = True
    example: str = "The capital of France is"
    target: str = " Paris"
    add_bos: bool = PREPEND_BOS


@dataclass
class Result(StudyResult):
    """Tables ``dynamics`` (per checkpoint and layer), ``example_lens`` (the example's lens per position and layer)
    and ``token_dynamics`` (share of tokens per dynamics class, per checkpoint)."""

    STUDY: ClassVar[str] = STUDY
    CONFIG: ClassVar[type] = DynamicsConfig

    def figures(self) -> dict:
        table, ex = self.tables["dynamics"], self.tables["example_lens"]
        ys = [c for c in ("entropy", "kl_to_final", "next_token_ce", "norm", "cos_last", "belief_r2") if c in table]
        out = {"dynamics": plot_over_checkpoints(table, "site", ys, f"{self.summary.get('n_prompts', '?')} prompts")}
        ranked = ex.dropna(subset=["target_rank"])  # with target "next" the last position has no target
        last = ex[ex["position"] == (ranked if len(ranked) else ex)["position"].max()]
        out["example_rank"] = plot_over_checkpoints(last, "site", ["target_rank", "top1_prob"],
                                                    f"{self.config.example!r} -> {self.config.target!r}")
        return out

    def report(self) -> str:
        s = self.summary
        return "\n".join([
            "# Latent-state dynamics", "", f"Checkpoints: {', '.join(s.get('checkpoints', []))}; "
            f"{s.get('n_prompts', '?')} prompts; lens: {s.get('lens', 'logit')}"
            + (" (one lens over every checkpoint: matched in shape, not trained on each)."
               if s.get("lens", "logit") != "logit" and not s.get("lens_weights_checked", True) else "."), "",
            markdown_table(self.tables["dynamics"].round(4)), "", "Token dynamics (share of tokens):", "",
            markdown_table(self.tables["token_dynamics"]), "", "![dynamics](dynamics.png)", "",
            "![example](example_rank.png)", ""])


def measure_checkpoint(config: DynamicsConfig, prompts: list[str], strict_lens: bool, given: dict, spec: str) -> dict:
    """Everything the study measures on one checkpoint, as plain tables (no model): ``dynamics`` (one row per
    site, embed and every block), ``example_lens`` (the example's lens per position and site) and ``shares`` (the
    share of tokens per dynamics class, with the model's spec). ``given`` maps a spec to an already loaded handle
    (used as it is and left loaded); any other spec is loaded here and unloaded at the end."""
    with config.opened(spec, given) as h:
        tl = TunedLens.load(config.lens, h, check_weights=strict_lens) if config.lens else None
        df = dynamics_summary(h, prompts, config.batch_size, lens=tl, add_bos=config.add_bos)
        if config.belief:
            bel = belief_state_predictability(h, prompts, batch_size=config.batch_size, add_bos=config.add_bos)
            df = df.merge(bel.rename(columns={"r2": "belief_r2", "cosine": "belief_cosine"})
                          [["layer", "belief_r2", "belief_cosine"]], on="layer", how="left")
        traj = residual_trajectory(h, prompts[: config.batch_size], add_bos=config.add_bos, logits=False)
        norms = traj.hidden.norm(dim=-1)[:, traj.attention_mask.bool()]
        return {"dynamics": df,
                "example_lens": logit_lens(h, config.example, target=config.target, lens=tl,
                                           add_bos=config.add_bos).assign(model=h.spec),
                "shares": dynamics_shares(token_dynamics(norms)) | {"model": h.spec}}


def run(config: DynamicsConfig, handle=None, progress: bool = True, ray: str | None = None) -> Result:
    """Run the dynamics analyses on ``config.model`` (or ``handle``) and each of ``config.checkpoints``.

    ``ray``: a Ray address (``local`` | ``auto`` | a cluster address; needs checkpoints): one Ray task per
    checkpoint, each loading its model by spec (so no ``handle``); the tables are the serial run's."""
    prompts = prompt_set(config.prompts_file, config.n_prompts, config.chars)
    specs = [config.model] + [c for c in config.checkpoints if c]
    check_ray_sweep(ray, len(specs) - 1)
    if ray is not None and handle is not None:
        raise RayHandleError("run(..., ray=...) loads every checkpoint by spec in its Ray worker: call it without "
                             "handle= (config.model is loaded there)")
    labels = checkpoint_labels(specs)
    # one lens over a checkpoint sweep is the user's choice: checked for shape on every checkpoint, for the exact
    # weights only when there is one model (the summary records which)
    strict_lens = len(specs) == 1
    given = {} if handle is None else {specs[0]: handle}
    parts = map_checkpoints(partial(measure_checkpoint, config, prompts, strict_lens, given), specs, ray=ray,
                            progress=progress)
    table = stack_checkpoints([p["dynamics"] for p in parts], labels)
    ex = pd.concat([p["example_lens"].assign(checkpoint=lab) for p, lab in zip(parts, labels)], ignore_index=True)
    share_df = pd.DataFrame([p["shares"] for p in parts]).assign(checkpoint=labels)
    summary = {"checkpoints": specs, "n_prompts": len(prompts), "lens": str(config.lens) if config.lens else "logit",
               "lens_weights_checked": bool(config.lens) and strict_lens, "add_bos": config.add_bos,
               "token_dynamics": share_df.to_dict(orient="records")}
    return Result(config, summary, {"dynamics": table, "example_lens": ex, "token_dynamics": share_df})
