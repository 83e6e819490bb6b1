"""Truthful directions (``hiddenlens.analyses.truth``): ITI, RepE and mass-mean baselines, per layer and per head.

Activations are taken at the **last token** of each statement (the final "."), on the residual stream
(``blocks.{l}.resid_post``, ``[d_model]``) and per head on the attention output before the output projection
(``blocks.{l}.attn.z``, ``[head_dim]``; ITI's "head-wise" activations). Methods ("TruthPrInt: Mitigating LVLM Object Hallucination Via Latent Truthful-Guided Pre-Intervention" (arXiv 2503.10602), "Inference-Time Intervention: Eliciting Truthful Answers from a Language Model" (arXiv 2306.03341) and "Representation Engineering: A Top-Down Approach to AI Transparency" (arXiv 2310.01405)):

``mass_mean``  theta = mean(h | true) - mean(h | false)                       (ITI's released setting)
``probe``      the coefficient of a logistic regression (``C=1``, ``max_iter=1000``) fitted on train
``repe``       first principal component of recentred paired differences, pairs in random order, sign set so the
               true member projects higher in most pairs (RepE's ``PCARepReader``, ``n_difference=1``)

Every direction is stored as a unit vector ``u`` plus ``sigma = std(h . u)`` over the training statements of both
classes (pooled, so the between-class spread is included; ITI's std of projections), and a 1-D logistic detector
``p_true = sigmoid(a * (h . u) + b)`` fitted on the training projections, used for accuracy and for the per-token
detector of conditional steering. Held-out AUROC and accuracy are computed on a split whose entities never occur
in training (see :mod:`hiddenlens.analyses.truth_data`).

ComnHallu-style transfer (:func:`subspace_transfer`) is **INFERRED** (the paper's formula was not readable):
per-source PCA subspaces aligned by orthogonal Procrustes on paired inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from tqdm.auto import tqdm

from hiddenlens.common.stats import auroc
from hiddenlens.probes.capture import capture
from hiddenlens.probes.direction import Direction

from .truth_data import data_hash, make_statements

METHODS = ("mass_mean", "probe", "repe")


# ---- activations -----------------------------------------------------------------------------------------
def extract_last_token(handle, texts, layers=None, heads: bool = False, batch_size: int = 32,
                       progress: bool = False) -> dict[str, torch.Tensor]:
    """Last-token activations of ``texts``, batched by length without the LM head.

    Returns ``{"resid": [n, L, d_model]}`` and, with ``heads=True``, ``{"heads": [n, L, n_heads, head_dim]}``
    (float32, CPU), where ``L = len(layers)`` (all layers by default) in the order given.
    """
    layers = _check_layers(handle, layers)
    if len(texts) == 0:
        raise ValueError("no texts given")
    sites = [f"blocks.{i}.resid_post" for i in layers] + ([f"blocks.{i}.attn.z" for i in layers] if heads else [])
    with capture(handle, sites, positions="last", to="cpu") as cache:
        handle.run(list(texts), batch_size=batch_size, logits=False, sort_by_length=True, progress=progress)
    out = {"resid": torch.stack([cache[f"blocks.{i}.resid_post"][:, -1] for i in layers], 1).float()}
    if heads:
        out["heads"] = torch.stack([cache[f"blocks.{i}.attn.z"][:, :, -1] for i in layers], 1).float()
    return out


def _check_layers(handle, layers) -> list[int]:
    n = handle.adapter.n_layers
    layers = list(range(n)) if layers is None else [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} out of range: this model has layers 0..{n - 1}")
    return layers


# ---- direction fitting (numpy, float64) -------------------------------------------------------------------
def _xy(X, y) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X.detach().cpu() if isinstance(X, torch.Tensor) else X, dtype=np.float64)
    y = np.asarray(y).astype(int).reshape(-1)
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise ValueError(f"expected X [n, d] and y [n]; got X {X.shape}, y {y.shape}")
    if not np.isfinite(X).all():
        raise ValueError("activations hold NaN or Inf; re-extract them in float32")
    if set(np.unique(y)) != {0, 1}:
        raise ValueError(f"labels must contain both 0 (false) and 1 (true); got {sorted(set(np.unique(y)))}")
    return X, y


def unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    if not np.isfinite(n) or n == 0:
        raise ValueError("direction has zero or non-finite norm (are both classes identical?)")
    return v / n


def mass_mean_direction(X, y) -> np.ndarray:
    """``mean(X | y=1) - mean(X | y=0)``, ``[d]`` (not normalised)."""
    X, y = _xy(X, y)
    return X[y == 1].mean(0) - X[y == 0].mean(0)


def probe_direction(X, y, C: float = 1.0, seed: int = 0) -> np.ndarray:
    """Logistic-regression coefficient ``[d]``: ITI's probe (``LogisticRegression(max_iter=1000)``: L2, C=1, on
    the raw activations), solved to convergence by Newton's method (``newton-cholesky``, one d x d system per step).
    On residual streams, whose dimensions differ in scale by orders of magnitude, lbfgs stops at ``max_iter``
    short of the optimum (about 10 s per layer at d = 576); Newton reaches it in about a dozen steps."""
    X, y = _xy(X, y)
    return LogisticRegression(C=C, solver="newton-cholesky", max_iter=100, random_state=seed).fit(X, y).coef_[0]


def repe_direction(X, y, pair_ids, seed: int = 0) -> np.ndarray:
    """RepE reading vector: first PC of recentred paired differences; sign so the true member projects higher.

    ``pair_ids[i]`` names the contrast pair of row ``i``; each pair needs exactly one true and one false row.
    Within each pair the order of subtraction is random (seeded), as RepE shuffles its pairs.
    """
    X, y = _xy(X, y)
    pair_ids = np.asarray(pair_ids)
    t_rows, f_rows = [], []
    for p in np.unique(pair_ids):
        rows = np.flatnonzero(pair_ids == p)
        if len(rows) != 2 or sorted(y[rows]) != [0, 1]:
            continue
        t_rows.append(rows[y[rows] == 1][0])
        f_rows.append(rows[y[rows] == 0][0])
    if len(t_rows) < 2:
        raise ValueError("repe needs at least 2 contrast pairs with one true and one false member each")
    flip = np.random.default_rng(seed).random(len(t_rows)) < 0.5
    D = X[t_rows] - X[f_rows]
    D[flip] *= -1
    D = D - D.mean(0)
    d = np.linalg.svd(D, full_matrices=False)[2][0]
    agree = np.mean(X[t_rows] @ d > X[f_rows] @ d)
    return d if agree >= 0.5 else -d


def fit_direction(X, y, method: str, pair_ids=None, seed: int = 0) -> tuple[np.ndarray, float, tuple]:
    """Fit one direction: ``(unit [d], sigma, (a, b))`` with detector ``p_true = sigmoid(a * (x . u) + b)``."""
    X, y = _xy(X, y)
    if method == "mass_mean":
        v = mass_mean_direction(X, y)
    elif method == "probe":
        v = probe_direction(X, y, seed=seed)
    elif method == "repe":
        if pair_ids is None:
            raise ValueError("method='repe' needs pair_ids (the contrast pair of each row)")
        v = repe_direction(X, y, pair_ids, seed=seed)
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    u = unit(v)
    proj = X @ u
    return u, float(proj.std()), _detector(proj, y)


def _detector(proj: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    scale = proj.std() or 1.0
    lr = LogisticRegression(C=1e4, max_iter=1000).fit((proj / scale)[:, None], y)
    return float(lr.coef_[0, 0] / scale), float(lr.intercept_[0])


def auroc_accuracy(u: np.ndarray, detector, X, y) -> tuple[float, float]:
    """Held-out AUROC of ``X . u`` and accuracy of the detector at ``p_true = 0.5``."""
    X, y = _xy(X, y)
    proj = X @ u
    a, b = detector
    return auroc(y, proj), float(np.mean((a * proj + b > 0) == (y == 1)))


# ---- sweeps ----------------------------------------------------------------------------------------------
def layer_sweep(train: torch.Tensor, y_train, test: torch.Tensor, y_test, layers, methods=METHODS,
                pair_ids=None, seed: int = 0, val: torch.Tensor | None = None, y_val=None
                ) -> tuple[pd.DataFrame, dict]:
    """Fit every method at every layer on ``train [n, L, d]``; held-out AUROC/accuracy on ``test [m, L, d]`` and,
    when given, on ``val [v, L, d]`` (the split a layer is chosen on: :func:`select_layer`).

    Returns the table (``layer, method, auroc, accuracy, sigma`` and ``val_auroc, val_accuracy``) and
    ``{(method, layer): (u, sigma, det)}``.
    """
    rows, fitted = [], {}
    for j, layer in enumerate(layers):
        for method in methods:
            u, sigma, det = fit_direction(train[:, j], y_train, method, pair_ids, seed)
            auc, acc = auroc_accuracy(u, det, test[:, j], y_test)
            row = dict(layer=layer, method=method, auroc=auc, accuracy=acc, sigma=sigma)
            if val is not None:
                row["val_auroc"], row["val_accuracy"] = auroc_accuracy(u, det, val[:, j], y_val)
            rows.append(row)
            fitted[(method, layer)] = (u, sigma, det)
    return pd.DataFrame(rows), fitted


def select_layer(table: pd.DataFrame, method: str) -> int:
    """The layer whose ``method`` direction has the highest *validation* AUROC (ties: the earlier layer). The test
    columns never enter the choice, so the test AUROC reported at that layer is an honest held-out number."""
    if "val_auroc" not in table:
        raise ValueError("select_layer needs the validation columns: run layer_sweep with val=, y_val=")
    rows = table[table.method == method]
    if rows.empty:
        raise ValueError(f"no {method!r} rows in the layer table (methods: {sorted(set(table.method))})")
    return int(rows.sort_values(["val_auroc", "layer"], ascending=[False, True], kind="stable").iloc[0].layer)


def head_sweep(train: torch.Tensor, y_train, val: torch.Tensor, y_val, test: torch.Tensor, y_test, layers,
               seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """ITI head probing: a logistic regression per (layer, head) on ``train [n, L, H, hd]``, accuracy on val.

    Returns ``layer, head, val_accuracy, test_auroc`` (test AUROC of the probe's decision function).
    """
    _, y_train = _xy(train[:, 0, 0], y_train)
    rows = []
    cells = [(j, h) for j in range(len(layers)) for h in range(train.shape[2])]
    for j, h in tqdm(cells, desc="head probes", disable=not progress):
        lr = LogisticRegression(max_iter=1000, random_state=seed).fit(train[:, j, h].double().numpy(), y_train)
        val_acc = lr.score(val[:, j, h].double().numpy(), np.asarray(y_val))
        auc = auroc(np.asarray(y_test), lr.decision_function(test[:, j, h].double().numpy()))
        rows.append(dict(layer=layers[j], head=h, val_accuracy=float(val_acc), test_auroc=float(auc)))
    return pd.DataFrame(rows)


def top_k_heads(table: pd.DataFrame, k: int) -> list[tuple[int, int]]:
    """ITI's selection: the ``k`` heads with the highest validation accuracy (ties by test order, stable)."""
    if k < 1:
        raise ValueError("k must be at least 1")
    best = table.sort_values("val_accuracy", ascending=False, kind="stable").head(k)
    return [(int(r.layer), int(r.head)) for r in best.itertuples()]


def iti_directions(heads_acts: torch.Tensor, y, layers, selected, model: str = "", data_hash: str = "",
                   table: pd.DataFrame | None = None) -> list[Direction]:
    """Mass-mean directions for ITI's selected heads, fitted on ``heads_acts [n, L, H, hd]`` (train + val)."""
    pos = {l: j for j, l in enumerate(layers)}
    out = []
    for layer, head in selected:
        u, sigma, det = fit_direction(heads_acts[:, pos[layer], head], y, "mass_mean")
        metrics = {}
        if table is not None:
            row = table[(table["layer"] == layer) & (table["head"] == head)].iloc[0]
            metrics = {"val_accuracy": float(row.val_accuracy), "test_auroc": float(row.test_auroc)}
        out.append(Direction(torch.from_numpy(u).float(), sigma, f"blocks.{layer}.attn.z", head, "mass_mean",
                             model, data_hash, det, metrics))
    return out


def transfer_matrix(acts: dict[str, tuple], layer_index: int, method: str = "mass_mean") -> pd.DataFrame:
    """Cross-family transfer: fit on each family's train split, held-out AUROC on every family's test split.

    ``acts[family] = (train [n, L, d], y_train, test [m, L, d], y_test, pair_ids_train)``; ``layer_index`` indexes
    the L axis. Returns ``train_family, test_family, auroc, accuracy``.
    """
    rows = []
    for src, (xtr, ytr, _, _, pid) in acts.items():
        u, _, det = fit_direction(xtr[:, layer_index], ytr, method, pid)
        for tgt, (_, _, xte, yte, _) in acts.items():
            auc, acc = auroc_accuracy(u, det, xte[:, layer_index], yte)
            rows.append(dict(train_family=src, test_family=tgt, auroc=auc, accuracy=acc))
    return pd.DataFrame(rows)


# ---- per-token scores ------------------------------------------------------------------------------------
def token_scores(handle, direction: Direction, prompt: str, max_new_tokens: int = 0, add_bos=None) -> pd.DataFrame:
    """Per-token truthfulness along a (generated) sequence: TruthPrInt's "hidden states as per-token indicators".

    With ``max_new_tokens > 0`` the prompt is first continued greedily. One forward over the whole sequence then
    reads ``direction``'s site at every position. Returns ``position, token, generated, projection, p_true``
    (projection in units of h; p_true from the direction's detector).
    """
    ids = handle.tokenize([prompt], add_bos=add_bos).input_ids
    n_prompt = ids.shape[1]
    if max_new_tokens > 0:
        ids = handle.generate(ids, max_new_tokens=max_new_tokens).sequences
    site = direction.site
    with capture(handle, [site], to="cpu") as cache:
        handle.run(ids, logits=False)
    h = cache[site][0]
    if direction.head is not None:
        h = h[direction.head]
    proj = direction.project(h)
    toks = [handle.tokenizer.decode([t]) for t in ids[0].tolist()]
    return pd.DataFrame(dict(position=range(len(toks)), token=toks, generated=[i >= n_prompt for i in
                                                                             range(len(toks))],
                             projection=proj.numpy(), p_true=direction.p_true(h).numpy()))


# ---- ComnHallu-style subspace transfer (INFERRED) --------------------------------------------------------
def pca_basis(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[d]`` and top-``k`` principal axes ``[k, d]`` of ``X [n, d]``."""
    X = np.asarray(X, dtype=np.float64)
    if not 1 <= k <= min(X.shape):
        raise ValueError(f"k={k} must be between 1 and min(n, d) = {min(X.shape)}")
    mean = X.mean(0)
    return mean, np.linalg.svd(X - mean, full_matrices=False)[2][:k]


def procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Orthogonal ``R [k, k]`` minimising ``||source @ R - target||_F`` (rows paired)."""
    if source.shape != target.shape:
        raise ValueError(f"paired inputs must have the same shape; got {source.shape} and {target.shape}")
    u, _, vt = np.linalg.svd(source.T @ target)
    return u @ vt


def subspace_transfer(src_train, y_src, tgt_test, y_tgt, src_pair, tgt_pair, k: int = 16,
                      tgt_fit=None) -> dict:
    """Transfer a truth probe from a source space to a target space, with and without alignment (INFERRED).

    Our reading of ComnHallu (its formula is NOT FOUND): each source gets its own PCA subspace (``k`` axes,
    fitted on ``src_train`` and on ``tgt_fit``, default ``tgt_pair``); paired inputs (the same statements in two
    models, or class-matched statements of two families) give an orthogonal Procrustes map from target to
    source coordinates; a logistic probe trained on the source coordinates is scored on the target test set
    mapped by that rotation (``auroc_aligned``) and on raw target coordinates (``auroc_unaligned``).
    """
    src_train, _ = _xy(src_train, y_src)
    tgt_test, y_tgt = _xy(tgt_test, y_tgt)
    src_pair = np.asarray(src_pair, dtype=np.float64)
    tgt_pair = np.asarray(tgt_pair, dtype=np.float64)
    ms, Ps = pca_basis(src_train, k)
    mt, Pt = pca_basis(tgt_pair if tgt_fit is None else np.asarray(tgt_fit, dtype=np.float64), k)
    R = procrustes((tgt_pair - mt) @ Pt.T, (src_pair - ms) @ Ps.T)
    probe = LogisticRegression(max_iter=1000).fit((src_train - ms) @ Ps.T, y_src)
    zt = (tgt_test - mt) @ Pt.T
    return {"k": k, "auroc_aligned": auroc(y_tgt, probe.decision_function(zt @ R)),
            "auroc_unaligned": auroc(y_tgt, probe.decision_function(zt)),
            "auroc_source_train": auroc(y_src, probe.decision_function((src_train - ms) @ Ps.T))}


def class_matched_pairs(y_a, y_b, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices pairing true with true and false with false across two data sets (seeded; INFERRED pairing
    for cross-data alignment, where no input exists in both sets)."""
    rng = np.random.default_rng(seed)
    ia, ib = [], []
    for label in (0, 1):
        a = rng.permutation(np.flatnonzero(np.asarray(y_a) == label))
        b = rng.permutation(np.flatnonzero(np.asarray(y_b) == label))
        n = min(len(a), len(b))
        ia.append(a[:n])
        ib.append(b[:n])
    return np.concatenate(ia), np.concatenate(ib)


# ---- the whole analysis ----------------------------------------------------------------------------------
@dataclass
class TruthResult:
    """Output of :func:`fit_truth`: tables (pandas) and the fitted directions.

    ``layers`` (per layer and method: test auroc, accuracy; val_auroc, val_accuracy; sigma), ``heads`` (per layer
    and head: val_accuracy, test_auroc), ``transfer`` (train family x test family at ``best_layer``),
    ``projections`` (test statements' projection on the best direction, for histograms), ``directions`` (best
    layer, chosen on validation, one per method) and ``iti`` (the top-K head directions).
    """

    layers: pd.DataFrame
    heads: pd.DataFrame | None
    transfer: pd.DataFrame | None
    projections: pd.DataFrame
    directions: dict[str, Direction]
    iti: list[Direction]
    best_layer: int
    summary: dict


def fit_truth(handle, family: str = "capitals", transfer_families=(), layers=None, methods=METHODS,
              k_heads: int = 16, seed: int = 0, batch_size: int = 32, progress: bool = False) -> TruthResult:
    """Fit and evaluate truthful directions of ``family`` on ``handle`` (see the module docstring).

    Probes train on the ``train`` split; the best layer (probe AUROC) and ITI's heads are chosen on ``val``; every
    reported score is on ``test``, which no choice sees; the saved directions (best layer, one per method; ITI
    heads) are refitted on train + val.
    ``k_heads=0`` skips the per-head analysis.
    """
    layers = _check_layers(handle, layers)
    families = [family] + [f for f in transfer_families if f != family]
    df = make_statements(families, seed=seed)
    acts = extract_last_token(handle, df.text.tolist(), layers, heads=k_heads > 0, batch_size=batch_size,
                              progress=progress)
    fam = (df.family == family).to_numpy()
    part = {s: torch.tensor(fam & (df.split == s).to_numpy()) for s in ("train", "val", "test")}
    y = torch.tensor(df.label.to_numpy())
    tr, va, te = part["train"], part["val"], part["test"]
    table, _ = layer_sweep(acts["resid"][tr], y[tr], acts["resid"][te], y[te], layers, methods,
                           df.pair_id.to_numpy()[tr.numpy()], seed, val=acts["resid"][va], y_val=y[va])
    chooser = "probe" if "probe" in methods else methods[0]
    best_layer = select_layer(table, chooser)  # on validation only; the test split is reported, never chosen on
    best_row = table[(table.method == chooser) & (table.layer == best_layer)].iloc[0]
    j = layers.index(best_layer)
    trva = tr | va
    model, dh = handle.spec, data_hash(df[fam])
    directions = {}
    for method in methods:
        u, sigma, det = fit_direction(acts["resid"][trva][:, j], y[trva], method,
                                      df.pair_id.to_numpy()[trva.numpy()], seed)
        row = table[(table.method == method) & (table.layer == best_layer)].iloc[0]
        directions[method] = Direction(torch.from_numpy(u).float(), sigma, f"blocks.{best_layer}.resid_post", None, method,
                                       model, dh, det, {"test_auroc": float(row.auroc),
                                                        "test_accuracy": float(row.accuracy), "family": family})
    heads_table, iti = None, []
    if k_heads > 0:
        H = acts["heads"]
        heads_table = head_sweep(H[tr], y[tr], H[va], y[va], H[te], y[te], layers, seed, progress)
        iti = iti_directions(H[trva], y[trva], layers, top_k_heads(heads_table, k_heads), model, dh, heads_table)
    transfer = None
    if len(families) > 1:
        per = {}
        for f in families:
            m = (df.family == f).to_numpy()
            a = torch.tensor(m & (df.split == "train").to_numpy())
            b = torch.tensor(m & (df.split == "test").to_numpy())
            per[f] = (acts["resid"][a], y[a], acts["resid"][b], y[b], df.pair_id.to_numpy()[a.numpy()])
        transfer = transfer_matrix(per, j, "mass_mean")
    best = directions[methods[0]]
    test_df = df[te.numpy()]
    projections = pd.DataFrame(dict(text=test_df.text.tolist(), label=test_df.label.tolist(),
                                    projection=best.project(acts["resid"][te][:, j]).numpy()))
    summary = {"model": model, "family": family, "n_statements": int(fam.sum()), "layers": layers,
               "best_layer": best_layer, "best_layer_chosen_on": "val",
               "best_probe_auroc": float(best_row.auroc), "best_probe_val_auroc": float(best_row.val_auroc),
               "data_hash": dh,
               "directions": {k: {"sigma": d.sigma, **d.metrics} for k, d in directions.items()},
               "iti_heads": [[d.layer, d.head] for d in iti]}
    return TruthResult(table, heads_table, transfer, projections, directions, iti, best_layer, summary)
