"""``hiddenlens train-lens``: train a tuned lens and save it as safetensors (by default into the user cache, where the
dashboard and ``hiddenlens analyze tuned-lens`` find the lens of this model)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import options as o
from .options import DEFAULT_MODEL, Backend, BatchSize, Device, Dtype, Model, Threads


def train_lens(
        out: Optional[Path] = typer.Option(None, help="lens file to write (.safetensors; default: the user cache, "
                                           "keyed by the model's weights, which the dashboard reads)"),
        model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto",
        batch_size: BatchSize = 8,
        prompts_file: Optional[Path] = typer.Option(None, help=".txt / .jsonl prompts (default: offline prose)"),
        n_prompts: int = typer.Option(64, min=1), chars: int = typer.Option(400, min=1, help="characters per prose "
                                                                              "chunk"),
        init: str = typer.Option("lstsq", help="lstsq: closed-form least-squares translators, then the KL steps | "
                                 "zero: the KL steps from the logit lens (the paper's recipe; needs many steps)"),
        steps: int = typer.Option(8, min=1, help="steps on forward KL (each runs every depth through the full "
                                  "unembedding: 15-45 s for the embedded model on 2 CPU cores)"),
        tokens_per_step: int = typer.Option(64, min=1),
        max_tokens: int = typer.Option(4096, min=1, help="training tokens kept in memory"),
        optimizer: str = typer.Option("adam", help="adam (the default recipe, after the closed form) | sgd (the "
                                      "paper's Nesterov SGD; lr is then scaled by 1 - momentum)"),
        lr: float = typer.Option(1e-4, help="learning rate (the paper's SGD from zero: 1.0)"),
        threads: Threads = None) -> None:
    """Train a tuned lens (affine translators: closed-form init, then forward KL) and save it as safetensors."""
    from hiddenlens.analyses.tuned_lens import (HELD_OUT_SKIP, TunedLens, cached_lens_path, collect_states, lens_kl,
                                                train_tuned_lens, training_prompts)
    from hiddenlens.common.files import write_json
    from hiddenlens.studies.dynamics import prompt_set

    o.set_threads(threads)
    handle = o.load(model, backend, device, dtype)
    out = out if out is not None else cached_lens_path(handle)
    add_bos = handle.tokenizer.bos_token_id is not None
    prompts = prompt_set(prompts_file, n_prompts, chars)
    held = (training_prompts(8, chars, max(HELD_OUT_SKIP, n_prompts * chars)) if prompts_file is None
            else prompts[-8:])
    lens, history = train_tuned_lens(handle, prompts, steps=steps, tokens_per_step=tokens_per_step, lr=lr,
                                     max_tokens=max_tokens, batch_size=batch_size, init=init, optimizer=optimizer,
                                     add_bos=add_bos)
    lens.save(out)
    states, finals = collect_states(handle, held, lens.sites, max_tokens=1024, add_bos=add_bos)
    before = lens_kl(handle, TunedLens.for_model(handle), states, finals)
    after = lens_kl(handle, lens, states, finals)
    write_json(out.with_suffix(".json"), {"model": model, "init": init, "optimizer": optimizer, "lr": lr,
                                          "steps": steps, "tokens_per_step": tokens_per_step, "sites": lens.sites,
                                          "held_out_kl_logit_lens": before.tolist(),
                                          "held_out_kl_tuned_lens": after.tolist(),
                                          "train_kl": history["kl"].tolist()})
    o.console.print(f"held-out KL to the final distribution (nats, mean over depths): logit lens {before.mean():.3f}"
                    f" -> tuned lens {after.mean():.3f}; saved {out}")
