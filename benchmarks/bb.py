"""``hiddenlens bench bb``: a Bigram-Backcopy training step of hiddenlens beside a minimal plain-PyTorch model.

Contenders, same task in one process (interleaved rounds, medians, ratios from this one run):

``plain``        a minimal PyTorch model of the same architecture (:class:`PlainBB`: token + learned position
                 embeddings, pre-norm blocks of one softmax head and a 4x ReLU MLP, final LayerNorm, untied head,
                 no biases), the same width, layers, sequence length, batch and AdamW settings, a fresh
                 ``gen.sample`` batch every step; the timed loop is forward, loss, backward, optimizer step
``hiddenlens``   one whole :func:`hiddenlens.models.bb_training.train` call of the same steps (model and data
                 setup, the loop, the final loss evaluation), divided by the steps
``hiddenlens_sink_eval``  the same with the reproduction study's evaluation (sink metrics through captures every
                 ``eval_every`` steps): what a study run pays

Both clocks are reported: wall and process CPU time (``time.process_time``, the steadier one on a shared machine).
"""
from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable

import torch
from torch import nn

from hiddenlens.analyses.bb_metrics import sink_evaluator
from hiddenlens.common.files import write_json
from hiddenlens.models.bb_model import BBConfig
from hiddenlens.models.bb_task import BBGenerator
from hiddenlens.models.bb_training import train


def interleaved(contenders: dict[str, Callable[[], None]], reps: int, warmup: bool = True) -> dict[str, dict]:
    """Run every contender once per round (``reps`` rounds, after one warm-up round), round-robin.

    Returns ``{name: {"wall": [s per round], "cpu": [s per round]}}`` (CPU: this process, all its threads)."""
    if warmup:
        for fn in contenders.values():
            fn()
    times = {k: {"wall": [], "cpu": []} for k in contenders}
    for _ in range(reps):
        for k, fn in contenders.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            times[k]["cpu"].append(time.process_time() - c)
            times[k]["wall"].append(time.perf_counter() - w)
    return times


def ratio_rows(times: dict[str, dict], base: str, per: float = 1.0, unit: str = "s") -> list[dict]:
    """One row per contender: median wall / CPU per ``per`` units of work (in ``unit``) and the ratios to ``base``
    (contender / base: above 1 is slower)."""
    med = {k: {c: statistics.median(v[c]) for c in ("wall", "cpu")} for k, v in times.items()}
    return [{"contender": k, f"wall_{unit}": m["wall"] / per, f"cpu_{unit}": m["cpu"] / per,
             "wall_x_base": m["wall"] / med[base]["wall"], "cpu_x_base": m["cpu"] / med[base]["cpu"]}
            for k, m in med.items()]


def print_rows(rows: list[dict], title: str, unit: str) -> None:
    from rich.console import Console
    from rich.table import Table

    label = unit.replace("_per_", "/")
    t = Table(title=title)
    for c in ("contender", f"wall {label}", f"CPU {label}", "wall x base", "CPU x base"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["contender"], f"{r[f'wall_{unit}']:.3g}", f"{r[f'cpu_{unit}']:.3g}", f"{r['wall_x_base']:.3f}",
                  f"{r['cpu_x_base']:.3f}")
    Console().print(t)


class PlainBlock(nn.Module):
    """Pre-norm block: one softmax head over ``d`` and a 4x ReLU MLP, no biases."""

    def __init__(self, d: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv, self.out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x [b, t, d], mask [t, t] additive
        q, k, v = self.qkv(self.ln1(x)).split(x.shape[-1], -1)
        a = (q @ k.transpose(1, 2) / math.sqrt(x.shape[-1]) + mask).softmax(-1)
        x = x + self.out(a @ v)
        return x + self.proj(torch.relu(self.fc(self.ln2(x))))


class PlainBB(nn.Module):
    """The BB architecture in plain PyTorch: ``ids [b, t] -> logits [b, t, vocab]``."""

    def __init__(self, vocab: int, d: int, n_layers: int, seq: int):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(PlainBlock(d) for _ in range(n_layers))
        self.ln, self.head = nn.LayerNorm(d, bias=False), nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", torch.full((seq, seq), float("-inf")).triu(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.emb(ids) + self.pos.weight[:t]
        for b in self.blocks:
            x = b(x, self.mask[:t, :t])
        return self.head(self.ln(x))


def plain_training(cfg: BBConfig, gen: BBGenerator) -> Callable[[], None]:
    """A function running ``cfg.steps`` plain-PyTorch training steps (a fresh model each call)."""

    def run() -> None:
        torch.manual_seed(cfg.seed)
        model = PlainBB(gen.vocab_size, cfg.d_model, cfg.n_layers, cfg.seq_length)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        rng = torch.Generator().manual_seed(cfg.seed)
        for _ in range(cfg.steps):
            x = gen.sample(cfg.batch_size, rng)
            logits = model(x[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def run_bb_benchmark(steps: int = 200, n_layers: int = 1, reps: int = 3, eval_every: int = 100,
                     threads: int | None = 1, out: str | None = None) -> dict:
    """Time the contenders (module docstring); print the table; write JSON to ``out`` when given."""
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = BBConfig(steps=steps, n_layers=n_layers)
    gen = BBGenerator(k=cfg.k, seq_length=cfg.seq_length)
    contenders = {"plain": plain_training(cfg, gen),
                  "hiddenlens": lambda: train(cfg),
                  "hiddenlens_sink_eval": lambda: train(cfg, eval_every=eval_every, evaluate=sink_evaluator())}
    times = interleaved(contenders, reps)
    rows = ratio_rows(times, "plain", per=steps / 1000, unit="ms_per_step")
    result = {"steps": steps, "n_layers": n_layers, "d_model": cfg.d_model, "seq_length": cfg.seq_length,
              "batch_size": cfg.batch_size, "reps": reps, "eval_every": eval_every,
              "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()), "rows": rows,
              "times": times, "goal": "hiddenlens <= 1.5x plain (CPU time)",
              "goal_met": next(r for r in rows if r["contender"] == "hiddenlens")["cpu_x_base"] <= 1.5}
    print_rows(rows, f"BB training, {n_layers} layer(s), {steps} steps x {reps} rounds, "
                     f"{torch.get_num_threads()} thread(s)", "ms_per_step")
    print(f"goal hiddenlens <= 1.5x plain (CPU): {'yes' if result['goal_met'] else 'NO'}")
    if out:
        write_json(out, result)
    return result
