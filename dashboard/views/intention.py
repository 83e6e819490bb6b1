"""Intention: H_int of the prompt, and the regime comparison (accuracy, H_int, dim_eff per layer, Recov with CI)
loaded from a ``hiddenlens analyze intention`` run or computed live on a small set."""
import streamlit as st

from hiddenlens.dashboard import backend, figures, modelstore, ui

st.header("Intention")
key = ui.require_model()
prompt = ui.prompt()
with ui.shown_errors("H_int of the prompt"):
    h = backend.prompt_intention(key, prompt, add_bos=ui.add_bos())
    c1, c2 = st.columns(2)
    c1.metric("H_int of the prompt (top-100, bits)", f"{h['h_int_bits']:.3f}")
    c2.metric("H_int, full vocabulary (bits)", f"{h['h_int_full_bits']:.3f}")
    st.caption("Entropy of the next-token distribution at the last position of the prompt as typed (no chat "
               f"template; BOS {'prepended' if ui.add_bos() else 'not prepended'}, sidebar); the regimes below wrap "
               "each problem in the model's chat template.")

st.subheader("Regimes: direct vs chain of thought vs babble")
source = st.radio("Source", ["Load a run", "Compute live on a small set"], horizontal=True, key="int_source")
tables = None
if source == "Load a run":
    path = st.text_input("Report folder of `hiddenlens analyze intention`", key="int_path",
                         placeholder=f"{modelstore.runs_dir()}/intention")
    if path.strip():
        try:
            tables = backend.regime_tables(path)
        except backend.ResultsError as exc:
            st.error(f"Cannot open this run: {exc}")
else:
    c1, c2, c3, c4 = st.columns(4)
    n = c1.slider("Problems", 4, 40, 10, key="int_n")
    regimes = c2.multiselect("Regimes", ["direct", "cot", "babble"], default=["direct", "cot", "babble"],
                             key="int_regimes")
    budget = c3.slider("New tokens per answer", 4, 128, 24, key="int_budget")
    shots = c4.number_input("Worked examples (shots)", 0, 8, backend.default_shots(), key="int_shots",
                            help="few-shot examples before each question; the default is the CLI's --shots default")
    st.caption("Generated arithmetic problems, greedy decoding, Recov by 5-fold CV (needs both right and wrong "
               "answers). Small sets give wide intervals.")
    if regimes and st.toggle("Run", key="int_run"):
        with ui.shown_errors("The live regime run"), st.status(
                f"Computing live: {n} problems in each of {len(regimes)} regimes ({', '.join(regimes)}): greedy "
                f"answers (up to {budget} new tokens), then the states' dimensionality, Recov probes and bootstrap "
                "intervals", expanded=False) as running:
            tables = backend.live_regimes(key, n, tuple(regimes), budget, shots=int(shots))
            running.update(label=f"Computed live: {n} problems x {len(regimes)} regimes", state="complete")
if tables is not None:
    reg = tables["regimes"]
    if not len(reg) or ("accuracy" in reg.columns and (reg["accuracy"].fillna(0) == 0).all()):
        st.warning("Degenerate result: accuracy is 0 in every regime (no answer was right), so Recov and the "
                   "accuracy bars say nothing. Try more new tokens per answer, a few worked examples (shots), or a "
                   "larger model.")
    labels = list(reg["regime"])
    left, mid, right = st.columns(3)
    if {"accuracy_ci_low", "accuracy_ci_high"} <= set(reg.columns):
        left.plotly_chart(figures.bar_ci(labels, reg["accuracy"], reg["accuracy_ci_low"], reg["accuracy_ci_high"],
                                         "Accuracy (Wilson 95% CI)", "accuracy"), key="int_acc")
    if {"h_int_ci_low", "h_int_ci_high"} <= set(reg.columns):
        mid.plotly_chart(figures.bar_ci(labels, reg["h_int_bits"], reg["h_int_ci_low"], reg["h_int_ci_high"],
                                        "H_int (bootstrap 95% CI)", "bits"), key="int_hint")
    if {"recov_auroc", "recov_ci_low", "recov_ci_high"} <= set(reg.columns):
        right.plotly_chart(figures.bar_ci(labels, reg["recov_auroc"], reg["recov_ci_low"], reg["recov_ci_high"],
                                          "Recov: AUROC of correctness from the states", "AUROC", reference=0.5),
                           key="int_recov")
    dims = tables["dims"]
    dims = dims[dims["state"] == "pre"] if "state" in dims.columns else dims
    curves = {r: g.sort_values("layer")["participation_ratio"].to_numpy() for r, g in dims.groupby("regime")}
    layers = [f"L{int(x)}" for x in sorted(dims["layer"].unique())]
    st.plotly_chart(figures.layer_curves(curves, "dim_eff per layer (participation ratio)", "dim_eff", layers),
                    key="int_dims")
    ui.table(reg, "intention_regimes", "int_csv")
    if source != "Load a run":
        # the same positional arguments as live_regimes passes: the cached study result is written, not rerun
        ui.save_as_run(lambda: backend.live_intention(key, n, tuple(regimes), budget, 0, int(shots)), "intention",
                       "int_save")
