"""Reproduce: two studies of the reproduction on the embedded model, their claims and verdicts in one report
(docs/reproduce.md). Writes the run folder into $HIDDENLENS_OUT (default runs/examples/reproduce);
`hiddenlens reproduce [--quick] --out DIR` runs every study.
"""
import os
from pathlib import Path

import hiddenlens as hl
from hiddenlens.studies import reproduce

OUT = Path(os.environ.get("HIDDENLENS_OUT", "runs/examples")) / "reproduce"
handle = hl.load_model()                                     # SmolLM2-135M-Instruct, offline, fp32 on CPU
config = reproduce.ReproduceConfig(quick=True, studies=["patching", "iteration"],
                                   overrides={"patching": {"limit": 2}, "iteration": {"chunks": 2, "seq_len": 64}})
res = reproduce.run(config, handle, progress=False)
res.write(OUT, overwrite=True)                               # report.md, claims.png, claims table, patching/, iteration/
print(res.tables["claims"][["claim", "ours", "verdict", "seconds"]].to_string(index=False))
