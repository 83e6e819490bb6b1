"""Reliability: a few hostile inputs on the tiny model and the one-line error each gives, then the figure of
docs/reliability.md's table (hostile cases per category: the risk each case carries, and what it gives now).
Writes reliability.png into $HIDDENLENS_OUT (default runs/examples).
"""
import os
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import hiddenlens as hl  # noqa: E402
from hiddenlens.common.errors import UserError  # noqa: E402
from hiddenlens.probes.direction import Direction  # noqa: E402

OUT = Path(os.environ.get("HIDDENLENS_OUT", "runs/examples"))
handle = hl.load_model("tiny-llama")                       # random tiny Llama: no download, loads in a second
attempts = {
    "reversed layer range": lambda: hl.capture(handle, "blocks.3-1.resid_post"),
    "position past the end": lambda: handle.run_with_cache(["one two three"], "blocks.0.resid_post", positions=100),
    "token id outside the vocabulary": lambda: handle.run([[1, 2, 99999]]),
    "zero steering direction": lambda: Direction(torch.zeros(handle.adapter.d_model), 1.0, "blocks.1.resid_post"),
    "model folder that does not exist": lambda: hl.load_model("/nonexistent/dir"),
}
for what, attempt in attempts.items():
    try:
        attempt()
        print(f"{what:34s} NO ERROR")
    except (UserError, ValueError, KeyError, FileNotFoundError) as exc:
        print(f"{what:34s} {type(exc).__name__}: {str(exc)[:110]}")

# the summary table of docs/reliability.md -> a bar chart per category: the risk and the result now
doc = (Path(__file__).resolve().parents[1] / "reliability.md").read_text(encoding="utf-8")
table = doc.split("<!-- hostile-table: begin -->")[1].split("<!-- hostile-table: end -->")[0].strip().splitlines()
header = [h.strip() for h in table[0].strip("|").split("|")]
rows = [[c.strip().strip("*") for c in line.strip("|").split("|")] for line in table[2:]]
rows = [r for r in rows if r[0] != "all"]
now = ["clear error", "works correctly", "silently wrong", "raw internal error", "lost data", "security exposure"]
risk = ["risk: silently wrong", "risk: raw error", "risk: lost", "risk: security"]
colors = {"clear error": "#4c72b0", "works correctly": "#55a868", "silently wrong": "#c44e52",
          "raw internal error": "#dd8452", "lost data": "#8172b3", "security exposure": "#937860"}
fig, ax = plt.subplots(figsize=(10, 4.2))
for i, row in enumerate(rows):
    value = dict(zip(header, row))
    left = 0
    for col, key in zip(["silently wrong", "raw internal error", "lost data", "security exposure"], risk):
        n = int(value[key])
        ax.barh(i + 0.2, n, left=left, height=0.38, color=colors[col], alpha=0.45)
        left += n
    left = 0
    for col in now:
        n = int(value[col])
        ax.barh(i - 0.2, n, left=left, height=0.38, color=colors[col], label=col if i == 0 else None)
        left += n
ax.set_yticks(range(len(rows)), [f"{r[0]}\n(now / risk)" for r in rows])
ax.invert_yaxis()
ax.set_xlabel("hostile cases (solid, upper bar: what each gives now; "
              "faded, lower bar: what it would be if it regressed)")
ax.legend(loc="lower right", fontsize=8)
ax.set_title(re.sub(r"\s+", " ", f"{sum(int(dict(zip(header, r))['cases tried']) for r in rows)} hostile cases: "
                                 "no silently wrong result, no lost data, no security exposure"))
fig.tight_layout()
OUT.mkdir(parents=True, exist_ok=True)
fig.savefig(OUT / "reliability.png", dpi=120)
print(f"figure -> {OUT / 'reliability.png'}")
