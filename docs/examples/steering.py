"""Steering with a truthful direction (docs/steering.md): the four modes, what each one added where, and the
margin of the correct capital vs alpha beside a random direction of the same size.
Needs $HIDDENLENS_OUT/truth/ from docs/examples/truth.py (run it first with the same HIDDENLENS_OUT). Writes
steering.png.

Writes into $HIDDENLENS_OUT (default runs/examples; HIDDENLENS_OUT=docs/figures regenerates the docs'
figure).
"""
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import hiddenlens as hl
from hiddenlens.analyses.truth_data import make_statements
from hiddenlens.interventions.steer import steer_generate
from hiddenlens.probes.direction import load_directions
from hiddenlens.studies.steering import answer_logprobs, random_like

OUT = Path(os.environ.get("HIDDENLENS_OUT", "runs/examples"))    # where figures and files go
OUT.mkdir(parents=True, exist_ok=True)

handle = hl.load_model()
d = load_directions(OUT / "truth" / "direction_mass_mean")   # [Direction]; .sigma, .layer, .detector
prompts = ["The capital of Kenya is", "Q: What is the capital of Peru? A:"]
fig, ax = plt.subplots(1, 3, figsize=(15, 3.6))
modes, rows = ["all", "prompt", "generated", "conditional"], []
for mode in modes:
    out = steer_generate(handle, prompts, d, alpha=4.0, mode=mode, max_new_tokens=10)
    print(f"{mode:12s}", [t.strip() for t in out.texts], "rollback at", out.rollback or "-")
    rows.append(out.added_norm[1].numpy())                 # second prompt: no left padding
im = ax[0].imshow(rows, aspect="auto", cmap="Greens", vmin=0)
ax[0].axvline(out.prompt_length - 0.5, color="grey", ls=":")
ax[0].set_yticks(range(len(modes)), modes)
ax[0].set(xlabel="position (prompt | generated)", title=f"added norm per token (alpha 4 x sigma {d[0].sigma:.2f})")
fig.colorbar(im, ax=ax[0])

df = make_statements(["capitals"], fractions=(0.6, 0.2, 0.2))
pairs = df[(df.split == "test") & (df.label == 1)]
alphas = [0, 1, 2, 4, 8]
for ds, style in ((d, "-"), (random_like(d, seed=1), ":")):
    margins, ces = [], []
    for a in alphas:
        m = (answer_logprobs(handle, pairs.prompt.tolist(), pairs.correct.tolist(), ds, a)
             - answer_logprobs(handle, pairs.prompt.tolist(), pairs.wrong.tolist(), ds, a))
        margins.append(float(m.mean()))
    ax[1].plot(alphas, margins, style, marker=".", label=ds[0].method)
ax[1].set(xlabel="alpha", ylabel="log P(correct) - log P(wrong), nats",
          title=f"{len(pairs)} held-out capitals ({d[0].name})")
ax[1].legend()
cond = steer_generate(handle, ["The capital of Australia is"], d, 4.0, "conditional", max_new_tokens=12)
ax[2].plot(cond.p_true[0], marker="o")
ax[2].axhline(0.5, color="grey", ls=":")
ax[2].set(xlabel="checked new token", ylabel="detector p_true",
          title="conditional: detector on each new token")
ax[2].text(0, 0.3, f"rollback at position {cond.rollback[0]}\n'{cond.texts[0].strip()[:32]}...'".replace("\n\n", " "),
           fontsize=8)
plt.savefig(OUT / "steering.png", dpi=90, bbox_inches="tight")
