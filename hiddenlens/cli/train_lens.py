"""``hiddenlens train-lens``: train a tuned lens and save it as safetensors."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import options as o
from .options import DEFAULT_MODEL, Backend, BatchSize, Device, Dtype, Model


def train_lens(
        out: Path = typer.Option(..., help="lens file to write (.safetensors)"),
        model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto",
        batch_size: BatchSize = 8,
        prompts_file: Optional[Path] = typer.Option(None, help=".txt / .jsonl prompts (default: offline prose)"),
        n_prompts: int = typer.Option(64, min=1), chars: int = typer.Option(400, min=1, help="characters per prose "
                                                                              "chunk"),
        steps: int = typer.Option(50, min=1), tokens_per_step: int = typer.Option(128, min=1),
        max_tokens: int = typer.Option(4096, min=1, help="training tokens kept in memory"),
        lr: float = typer.Option(1.0, help="learning rate before the (1 - momentum) scaling")) -> None:
    """Train a tuned lens (zero-init affine translators, forward KL) and save it as safetensors."""
    from hiddenlens.analyses.tuned_lens import TunedLens, collect_states, lens_kl, train_tuned_lens
    from hiddenlens.common.files import write_json
    from hiddenlens.studies.dynamics import prompt_set

    handle = o.load(model, backend, device, dtype)
    prompts = prompt_set(prompts_file, n_prompts, chars)
    held = prompt_set(None, 8, chars, skip=n_prompts * chars + 10_000) if prompts_file is None else prompts[-8:]
    lens, history = train_tuned_lens(handle, prompts, steps=steps, tokens_per_step=tokens_per_step, lr=lr,
                                     max_tokens=max_tokens, batch_size=batch_size)
    lens.save(out)
    states, finals = collect_states(handle, held, lens.sites, max_tokens=1024)
    before = lens_kl(handle, TunedLens.for_model(handle), states, finals)
    after = lens_kl(handle, lens, states, finals)
    write_json(out.with_suffix(".json"), {"model": model, "steps": steps, "tokens_per_step": tokens_per_step,
                                          "sites": lens.sites, "held_out_kl_logit_lens": before.tolist(),
                                          "held_out_kl_tuned_lens": after.tolist(),
                                          "train_kl": history["kl"].tolist()})
    o.console.print(f"held-out KL to the final distribution (nats, mean over depths): logit lens {before.mean():.3f}"
                    f" -> tuned lens {after.mean():.3f}; saved {out}")
