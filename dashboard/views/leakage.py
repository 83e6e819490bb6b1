"""Semantic leakage: replace a span's contextual states with its uncontextualized ones over a layer range, and
compare next-token distributions and continuations before and after."""
import re

import pandas as pd
import streamlit as st

from hiddenlens.dashboard import backend, figures, ui

st.header("Semantic leakage")
key = ui.require_model()
prompt = ui.prompt()
st.caption("Follow-the-Flow replacement: the span's residual states are overwritten by its states when "
           "`[BOS] + span` runs alone, at the output of every block in the range (`blocks.l.resid_post`); "
           "later tokens see the replaced span. The prompt gets BOS first when \"Prepend BOS\" (sidebar) is on; "
           "the lone run always starts with BOS.")
words = sorted({w for w in re.findall(r"[A-Za-z][\w'-]*", prompt)}, key=prompt.find)
# A span picked (or typed) for an earlier prompt is stale once the prompt changes: start again from a word of the
# new prompt instead of failing on the old one.
stale = None
if st.session_state.get("leak_prompt_seen") != prompt:
    old_span = st.session_state.get("leak_span")
    if old_span and old_span not in prompt:
        stale = old_span
        del st.session_state["leak_span"]
    st.session_state["leak_prompt_seen"] = prompt
c1, c2 = st.columns(2)
span = c1.selectbox("Span (a word of the prompt)", words, index=len(words) // 2 if words else None, key="leak_span",
                    accept_new_options=True, help="pick a word, or type any substring of the prompt")
n_layers = backend.model_card(key)["architecture"]["n_layers"]
first, last = c2.slider("Block range (outputs replaced)", 0, n_layers - 1, (0, max(1, n_layers // 2)),
                        key="leak_layers")
c1, c2, c3 = st.columns(3)
mode = c1.selectbox("Positions of the lone run", ["isolated", "original"], key="leak_mode")
which = c2.selectbox("Span tokens replaced", ["all", "last"], key="leak_tokens")
new_tokens = c3.slider("New tokens", 4, 48, 16, key="leak_new")
if stale is not None:
    st.info(f"The prompt changed and no longer holds the span '{stale}': the span is now "
            + (f"'{span}'." if span else "empty; pick a word of the prompt."))
if not span:
    st.info("Pick a span of the prompt.")
    st.stop()
add_bos = ui.add_bos()
with ui.shown_errors("The replacement"):
    bar = st.empty()
    m = st.columns(3)
    left, right = st.columns(2)
    left.markdown("**Before** (plain)")
    right.markdown(f"**After** (span *{span}* replaced at blocks {first}-{last})")
    slots = {"before": left.empty(), "after": right.empty()}
    cmp = backend.replacement(
        key, prompt, span, first, last, mode, which, 10, new_tokens, add_bos,
        progress=lambda done, stage: bar.progress(min(max(done, 0.0), 1.0), text=stage),
        stream=lambda name, text: slots[name].code(prompt + text, language=None, wrap_lines=True))
    bar.empty()
    m[0].metric("Span tokens", cmp.span.n_tokens)
    m[1].metric("KL(after || before), next token", f"{cmp.kl_after_before:.4f} nats")
    changes = cmp.log.by_site()
    m[2].metric("Largest state change", f"{max(changes.values()):.2f}" if changes else "none")
    slots["before"].code(prompt + cmp.continuation_before, language=None, wrap_lines=True)
    slots["after"].code(prompt + cmp.continuation_after, language=None, wrap_lines=True)
    left.caption(f"{cmp.new_tokens_before} new tokens (greedy)")
    right.caption(f"{cmp.new_tokens_after} new tokens (greedy)")
    table = cmp.table
    ui.save_view(key, "leakage", {"span": span, "blocks": [first, last], "mode": mode, "tokens": which,
                                  "new_tokens": int(new_tokens), "add_bos": add_bos},
                 {"next_token": table, "continuations": pd.DataFrame(
                     {"before": [cmp.continuation_before], "after": [cmp.continuation_after]})},
                 {"kl_after_before_nats": float(cmp.kl_after_before), "span_tokens": int(cmp.span.n_tokens)},
                 button_key="leak_save")
    st.plotly_chart(figures.grouped_bars(table["token"].map(repr).tolist(),
                                         {"before": table["p_before"], "after": table["p_after"]},
                                         "Next-token probabilities before and after", "probability"),
                    key="leak_bars")
    if changes:
        st.plotly_chart(figures.layer_curves({"largest |change|": list(changes.values())},
                                             "How much the replacement moved the span's states", "L2",
                                             [str(k) for k in changes], xaxis="site"), key="leak_changes")
