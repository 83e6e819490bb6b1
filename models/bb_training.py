"""Training Bigram-Backcopy models: AdamW or SGD with momentum, fresh samples every step (drawn
:data:`PREFETCH` batches at a time, the same stream as one ``gen.sample`` per step), full next-token cross-entropy.
The step itself is a plain transformers forward / backward / optimizer step; ``hiddenlens bench bb`` times it
beside a minimal plain-PyTorch model of the same architecture (docs/performance.md).

Every ``eval_every`` steps (and at the last step) ``evaluate(model, tokenizer, generator) -> dict`` adds a
row to the history. The default, :func:`loss_evaluator`, records the losses on trigger queries (backcopy targets)
and non-trigger queries (bigram targets) beside the bigram optimum with a plain forward; the sink metrics per layer
(attention to BOS, value drains, residual peaks) need captures and live above this layer:
``hiddenlens.analyses.bb_metrics.sink_evaluator()``. Evaluation uses its own random stream, so it does not change
training.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from hiddenlens.common.folders import committed_folder

from .bb_model import BBConfig, build_model, save_checkpoint
from .bb_task import BBGenerator, BBStatistics, build_tokenizer, task_losses

#: evaluate(model, tokenizer, generator) -> one flat history row (without the step)
Evaluator = Callable[[object, object, BBGenerator], dict]


@dataclass
class TrainResult:
    """``model`` (trained, eval mode), ``tokenizer``, ``generator``, ``history`` (one row per evaluation: step and
    the evaluator's metrics) and ``checkpoints`` (folders, by step)."""

    model: object
    tokenizer: object
    generator: BBGenerator
    history: pd.DataFrame
    checkpoints: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def eval_batch(gen: BBGenerator, n_seqs: int = 256, seed: int = 12345) -> torch.Tensor:
    """The fixed evaluation sequences ``[n_seqs, seq_length + 1]`` (their own random stream)."""
    return gen.sample(n_seqs, torch.Generator().manual_seed(seed))


def loss_evaluator(n_seqs: int = 256, seed: int = 12345) -> Evaluator:
    """The default evaluator: :func:`hiddenlens.models.bb_task.task_losses` on ``n_seqs`` fresh sequences."""

    @torch.no_grad()
    def evaluate(model, tokenizer, gen: BBGenerator) -> dict:
        x = eval_batch(gen, n_seqs, seed)
        was_training = model.training
        model.eval()
        try:
            inp = x[:, :-1].to(model.device)
            logits = model(input_ids=inp, attention_mask=torch.ones_like(inp), use_cache=False).logits
        finally:
            model.train(was_training)
        return task_losses(logits, x, gen)

    return evaluate


def sample_batches(gen: BBGenerator, batch: int, k: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``k`` batches ``[batch, seq_length + 1]``, equal to ``k`` calls of ``gen.sample(batch, generator)`` (the same
    random draws in the same order, tested) but with one python loop over positions for all of them: the
    per-step sampling loop was about a tenth of a training step."""
    n = gen.seq_length + 1
    us, firsts = [], []
    for _ in range(k):  # the draws of gen.sample, call by call
        us.append(torch.rand(n, batch, 1, generator=generator, dtype=torch.float64))
        firsts.append(torch.multinomial(gen._first.expand(batch, -1), 1, generator=generator)[:, 0])
    u = torch.cat(us, 1)
    x = torch.empty(batch * k, n, dtype=torch.long)
    x[:, 0] = gen.bos_id
    x[:, 1] = torch.cat(firsts)
    last = gen.stats.n_chars - 1
    for t in range(2, n):
        prev = x[:, t - 1]
        bigram = torch.searchsorted(gen._cdf[prev], u[t], right=True)[:, 0].clamp_max(last)
        x[:, t] = torch.where(gen._is_trigger[prev], x[:, t - 2], bigram)
    return list(x.split(batch))


#: training batches drawn per call of :func:`sample_batches`
PREFETCH = 50


def _optimizer(cfg: BBConfig, params):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train(cfg: BBConfig, out_dir: str | Path | None = None, stats: BBStatistics | None = None,
          eval_every: int = 0, evaluate: Evaluator | None = None, progress: bool = False,
          overwrite: bool = False) -> TrainResult:
    """Train one BB model.

    Args:
        cfg: the run (see :class:`~hiddenlens.models.bb_model.BBConfig`).
        out_dir: where checkpoints go (``step_000000`` ... every ``cfg.checkpoint_every`` steps, plus the last
            step); None keeps the model in memory only. The folder is written as one commit (a hidden temporary
            folder renamed into place at the end, under the folder's lock); a used folder is refused unless
            ``overwrite``, which replaces it whole, so checkpoints of two runs never mix.
        stats: character statistics (default: ``pydoc_data.topics``).
        eval_every: also evaluate every this many steps (0: only at the last step).
        evaluate: the history row of an evaluation (default: :func:`loss_evaluator`).
        progress: a tqdm bar over steps.
    """
    if out_dir is None:
        return _train(cfg, None, stats, eval_every, evaluate, progress)
    out_dir = Path(out_dir)
    with committed_folder(out_dir, overwrite, fix="pass overwrite=True (--overwrite) to replace it") as tmp:
        res = _train(cfg, tmp, stats, eval_every, evaluate, progress)
    res.checkpoints = [out_dir / p.name for p in res.checkpoints]
    return res


def _train(cfg: BBConfig, out_dir: Path | None, stats: BBStatistics | None, eval_every: int,
           evaluate: Evaluator | None, progress: bool) -> TrainResult:
    gen = BBGenerator(stats, k=cfg.k, seq_length=cfg.seq_length)
    model = build_model(cfg, gen.vocab_size, gen.bos_id)
    tok = build_tokenizer(gen.stats.chars)
    evaluate = evaluate or loss_evaluator()
    opt = _optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    data_rng = torch.Generator().manual_seed(cfg.seed)
    history, ckpts = [], []
    eval_steps = set(range(0, cfg.steps + 1, eval_every)) if eval_every else set()
    ckpt_steps = set(range(0, cfg.steps + 1, cfg.checkpoint_every)) if cfg.checkpoint_every else set()
    eval_steps.add(cfg.steps)
    ckpt_steps.add(cfg.steps)

    def checkpoint(step: int) -> None:
        if step in eval_steps:
            history.append({"step": step} | evaluate(model, tok, gen))
        if out_dir is not None and step in ckpt_steps:
            ckpts.append(save_checkpoint(model, gen, cfg, out_dir / f"step_{step:06d}", step))

    start = time.perf_counter()
    steps = range(1, cfg.steps + 1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=f"BB {cfg.attention}/{cfg.optimizer} L{cfg.n_layers} seed {cfg.seed}", unit="step")
    model.train()
    checkpoint(0)
    ready: list[torch.Tensor] = []
    for step in steps:
        if not ready:
            ready = sample_batches(gen, cfg.batch_size, min(PREFETCH, cfg.steps - step + 1), data_rng)[::-1]
        x = ready.pop()
        inp = x[:, :-1]
        logits = model(input_ids=inp, attention_mask=torch.ones_like(inp), use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"BB training diverged at step {step} (loss {float(loss)}); lower lr={cfg.lr}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        checkpoint(step)
    model.eval()
    return TrainResult(model, tok, gen, pd.DataFrame(history), ckpts, time.perf_counter() - start)
