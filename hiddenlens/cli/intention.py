"""Intention and dynamics commands: ``hiddenlens analyze intention``, ``hiddenlens analyze dynamics``,
``hiddenlens train-lens`` and ``hiddenlens bench dimensionality``."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from . import analyze_app, app, bench_app

console = Console()


def _layers(spec: Optional[str], n_layers: int) -> list[int] | None:
    """``"25-29"`` / ``"3,7,9"`` / ``"-5--1"`` -> block indices (validated against the model)."""
    if not spec:
        return None
    from hiddenlens.probes.sites import resolve_sites

    return [s.layer for s in resolve_sites(f"blocks.{spec}.resid_post", n_layers)]


def _budgets(spec: Optional[str]) -> dict[str, int]:
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if not value.strip().isdigit():
            raise typer.BadParameter(f"{part!r}: write REGIME=TOKENS, e.g. direct=16,cot=96")
        out[key.strip()] = int(value)
    return out


def _checkpoint_list(model: str, checkpoints: Optional[List[str]]) -> list[str]:
    extra = [c.strip() for item in (checkpoints or []) for c in item.split(",") if c.strip()]
    return [model] + extra


@analyze_app.command("intention")
def intention_cmd(
        out: Path = typer.Option(..., help="report folder"),
        model: str = typer.Option("smollm2-135m-instruct", help="model spec (chat model)"),
        checkpoints: Optional[List[str]] = typer.Option(None, help="more checkpoints (dirs, hub ids, id@rev); "
                                                        "repeat or comma-separate"),
        n: int = typer.Option(200, help="number of word problems"),
        seed: int = typer.Option(0, help="problem-set seed"),
        regimes: str = typer.Option("direct,cot,babble", help="comma-separated: direct, cot, babble"),
        shots: int = typer.Option(0, help="worked examples before each question (few-shot)"),
        layers: Optional[str] = typer.Option(None, help="intention-state blocks, e.g. 25-29 (default: last 5)"),
        batch_size: int = typer.Option(8), max_new_tokens: Optional[str] = typer.Option(
            None, help="per-regime budgets, e.g. direct=16,cot=96,babble=64"),
        post_collapse: bool = typer.Option(False, help="also the v1 post-collapse state (final decode step)"),
        gsm8k: bool = typer.Option(False, help="use GSM8K (needs `datasets` and the hub) instead of the offline set"),
        dtype: str = typer.Option("auto")) -> None:
    """The regime experiment (direct / CoT / babble): accuracy, H_int, dim_eff, Recov; report folder in OUT."""
    import hiddenlens as hl
    from hiddenlens.analyses.arithmetic import gsm8k_problems, make_problems
    from hiddenlens.analyses.regimes import run_regimes, write_regime_report

    problems = gsm8k_problems(n) if gsm8k else make_problems(n, seed=seed)
    names = [r.strip() for r in regimes.split(",") if r.strip()]
    specs = _checkpoint_list(model, checkpoints)
    frames = []
    for spec in specs:
        from hiddenlens.analyses.checkpoints import checkpoint_label, parse_checkpoint

        name, rev = parse_checkpoint(spec)
        handle = hl.load_model(name, revision=rev, dtype=dtype)
        target = out if len(specs) == 1 else out / checkpoint_label(spec)
        res = run_regimes(handle, problems, regimes=names, shots=shots, layers=_layers(layers, handle.n_layers),
                          batch_size=batch_size, max_new_tokens=_budgets(max_new_tokens),
                          post_collapse=post_collapse, on_regime=lambda partial: write_regime_report(partial, target))
        frames.append(res.regimes.assign(checkpoint=checkpoint_label(spec)))
        console.print(res.regimes[["regime", "accuracy", "h_int_bits", "dim_eff_pr_agg", "recov_auroc"]])
        handle.unload()
    if len(specs) > 1:
        import pandas as pd

        from hiddenlens.analyses.checkpoints import plot_over_checkpoints
        from hiddenlens.analyses.report import ReportFolder

        table = pd.concat(frames, ignore_index=True)
        folder = ReportFolder(out)
        folder.table("regimes_by_checkpoint", table)
        folder.figure("regimes_by_checkpoint", plot_over_checkpoints(
            table, "checkpoint", ["accuracy", "h_int_bits", "dim_eff_pr_agg"], "per regime over checkpoints",
            hue="regime"))
    console.print(f"report written to {out}")


def _prompt_set(prompts_file: Optional[Path], n_prompts: int, chars: int, skip: int = 0) -> list[str]:
    """Prompts from a file (.txt one per line, .jsonl with 'text') or chunks of the offline prose."""
    if prompts_file is not None:
        import json

        if not prompts_file.is_file():
            raise typer.BadParameter(f"{prompts_file} does not exist")
        lines = [ln for ln in prompts_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        texts = [json.loads(ln)["text"] for ln in lines] if prompts_file.suffix == ".jsonl" else lines
        if not texts:
            raise typer.BadParameter(f"{prompts_file} holds no prompts")
        return texts[:n_prompts]
    from hiddenlens.models.tiny import offline_prose

    text = offline_prose()
    return [text[i:i + chars] for i in range(skip, skip + n_prompts * chars, chars)]


@analyze_app.command("dynamics")
def dynamics_cmd(
        out: Path = typer.Option(..., help="report folder"),
        model: str = typer.Option("smollm2-135m-instruct"),
        checkpoints: Optional[List[str]] = typer.Option(None, help="more checkpoints (dirs, hub ids, id@rev)"),
        prompts_file: Optional[Path] = typer.Option(None, help=".txt (one per line) or .jsonl ({'text'}); "
                                                    "default: offline prose chunks"),
        n_prompts: int = typer.Option(32), chars: int = typer.Option(400, help="characters per prose chunk"),
        batch_size: int = typer.Option(8), lens: Optional[Path] = typer.Option(None, help="tuned lens (.safetensors)"),
        belief: bool = typer.Option(True, help="also belief-state predictability per layer"),
        example: str = typer.Option("The capital of France is", help="prompt for the per-position lens table"),
        target: str = typer.Option(" Paris", help="target token for the example's rank trajectory"),
        dtype: str = typer.Option("auto")) -> None:
    """Per-layer lens statistics, geometry, token dynamics and belief-state R^2 (streamed over prompts)."""
    import pandas as pd

    from hiddenlens.analyses.checkpoints import checkpoint_label, over_checkpoints, plot_over_checkpoints
    from hiddenlens.analyses.dynamics import (belief_state_predictability, dynamics_shares, dynamics_summary,
                                              logit_lens, residual_trajectory, token_dynamics)
    from hiddenlens.analyses.report import ReportFolder, markdown_table
    from hiddenlens.analyses.tuned_lens import TunedLens

    prompts = _prompt_set(prompts_file, n_prompts, chars)
    specs = _checkpoint_list(model, checkpoints)
    examples, shares = [], []

    def analysis(handle) -> pd.DataFrame:
        tl = TunedLens.load(lens, handle) if lens else None
        df = dynamics_summary(handle, prompts, batch_size, lens=tl)
        if belief:
            bel = belief_state_predictability(handle, prompts, batch_size=batch_size)
            df = df.merge(bel.rename(columns={"r2": "belief_r2", "cosine": "belief_cosine"})
                          [["layer", "belief_r2", "belief_cosine"]], on="layer", how="left")
        traj = residual_trajectory(handle, prompts[: batch_size], logits=False)
        norms = traj.hidden.norm(dim=-1)[:, traj.attention_mask.bool()]
        shares.append(dynamics_shares(token_dynamics(norms, traj.layers)) | {"model": handle.spec})
        examples.append(logit_lens(handle, example, target=target, lens=tl).assign(model=handle.spec))
        return df

    table = over_checkpoints(specs, analysis, dtype=dtype)
    labels = table["checkpoint"].unique().tolist()
    folder = ReportFolder(out)
    folder.table("dynamics", table)
    ex = pd.concat([e.assign(checkpoint=lab) for e, lab in zip(examples, labels)], ignore_index=True)
    folder.table("example_lens", ex)
    share_df = pd.DataFrame(shares).assign(checkpoint=labels)
    folder.table("token_dynamics", share_df)
    ys = ["entropy", "kl_to_final", "next_token_ce", "norm", "cos_last"] + (["belief_r2"] if belief else [])
    folder.figure("dynamics", plot_over_checkpoints(table, "layer", ys, f"{len(prompts)} prompts"))
    ranked = ex.dropna(subset=["target_rank"])  # with --target next the last position has no target
    last = ex[ex["position"] == (ranked if len(ranked) else ex)["position"].max()]
    folder.figure("example_rank", plot_over_checkpoints(last, "layer", ["target_rank", "top1_prob"],
                                                        f"{example!r} -> {target!r}"))
    folder.summary({"checkpoints": specs, "n_prompts": len(prompts), "lens": str(lens) if lens else "logit",
                    "token_dynamics": share_df.to_dict(orient="records")})
    folder.markdown("\n".join([
        "# Latent-state dynamics", "", f"Checkpoints: {', '.join(specs)}; {len(prompts)} prompts; lens: "
        f"{lens or 'logit lens'}.", "", markdown_table(table.round(4)), "", "Token dynamics (share of tokens):", "",
        markdown_table(share_df), "", "![dynamics](dynamics.png)", "", "![example](example_rank.png)", ""]))
    console.print(table.round(3).to_string())
    console.print(f"report written to {out} ({', '.join(checkpoint_label(s) for s in specs)})")


@app.command("train-lens")
def train_lens_cmd(
        out: Path = typer.Option(..., help="lens file to write (.safetensors)"),
        model: str = typer.Option("smollm2-135m-instruct"),
        prompts_file: Optional[Path] = typer.Option(None, help=".txt / .jsonl prompts (default: offline prose)"),
        n_prompts: int = typer.Option(64), chars: int = typer.Option(400),
        steps: int = typer.Option(50), tokens_per_step: int = typer.Option(128),
        max_tokens: int = typer.Option(4096, help="training tokens kept in memory"),
        lr: float = typer.Option(1.0, help="learning rate before the (1 - momentum) scaling"),
        batch_size: int = typer.Option(8), dtype: str = typer.Option("auto")) -> None:
    """Train a tuned lens (zero-init affine translators, forward KL) and save it as safetensors."""
    import hiddenlens as hl
    from hiddenlens.analyses.tuned_lens import TunedLens, collect_states, lens_kl, train_tuned_lens
    from hiddenlens.probes.atomic import write_json

    handle = hl.load_model(model, dtype=dtype)
    prompts = _prompt_set(prompts_file, n_prompts, chars)
    held = _prompt_set(None, 8, chars, skip=n_prompts * chars + 10_000) if prompts_file is None else prompts[-8:]
    lens, history = train_tuned_lens(handle, prompts, steps=steps, tokens_per_step=tokens_per_step, lr=lr,
                                     max_tokens=max_tokens, batch_size=batch_size)
    lens.save(out)
    states, finals = collect_states(handle, held, lens.layers, max_tokens=1024)
    before = lens_kl(handle, TunedLens.for_model(handle), states, finals)
    after = lens_kl(handle, lens, states, finals)
    write_json(out.with_suffix(".json"), {"model": model, "steps": steps, "tokens_per_step": tokens_per_step,
                                          "layers": lens.layers, "held_out_kl_logit_lens": before.tolist(),
                                          "held_out_kl_tuned_lens": after.tolist(),
                                          "train_kl": history["kl"].tolist()})
    console.print(f"held-out KL to the final distribution (nats, mean over depths): logit lens {before.mean():.3f}"
                  f" -> tuned lens {after.mean():.3f}; saved {out}")


@bench_app.command("dimensionality")
def bench_dimensionality_cmd(n: int = typer.Option(100_000), d: int = typer.Option(576),
                             chunk: int = typer.Option(4096), out: Optional[Path] = typer.Option(None)) -> None:
    """Effective dimensionality of N x d activations: streaming covariance vs materialised matrix + sklearn PCA."""
    from hiddenlens.benchmarks.dimensionality import run_benchmark

    run_benchmark(n=n, d=d, chunk=chunk, out=out)
