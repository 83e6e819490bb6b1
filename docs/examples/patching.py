"""Patching: the layer x position map of two factual-recall pairs on the embedded model, and the direct logit
attribution of their clean prompts (docs/patching.md). Writes the study's run folder into $HIDDENLENS_OUT
(default runs/examples/patching); `hiddenlens patch` runs all six shipped pairs with attribution patching.
"""
import os
from pathlib import Path

import hiddenlens as hl
from hiddenlens.studies import patching

OUT = Path(os.environ.get("HIDDENLENS_OUT", "runs/examples")) / "patching"
handle = hl.load_model()                                     # SmolLM2-135M-Instruct, offline, fp32 on CPU
res = patching.run(patching.PatchingConfig(limit=2, attribution=False), handle, progress=False)
res.write(OUT, overwrite=True)                               # cells, summary, pairs, dla tables; report; figures
s = res.tables["summary"]
last = s[s.position == s.position.max()].set_index("layer")["normalized"]
subject = s[s.position == 3].set_index("layer")["normalized"]   # the landmark's last token ("um" / " Tower")
print(f"last position restores {last.loc[22]:.2f} at layer 22 and {last.loc[23]:.2f} at layer 23; "
      f"the subject's last token restores {subject.loc[10]:.2f} at layer 10 and {subject.loc[25]:.2f} at layer 25")
print(res.tables["dla"].sort_values("logit_diff").tail(3).to_string(index=False))
