"""Fit one compressed M²LA layer from a source attention and its calibration statistics.

Pipeline for one layer (``G`` KV heads of dim ``D``, ``P`` rotary pairs per head, ``H`` query heads):

1. **RoPE.** Per frequency ``f`` the ``G`` key pairs ``k_{g,f}`` are mixed by an invertible ``G x G``
   matrix ``V_f`` acting identically on both pair components, so it commutes with RoPE (every head
   rotates frequency ``f`` by the same angle; frequencies of different M-RoPE axes are never mixed).
   Keys become components ``k'_{f,i} = sum_g V_f[i, g] k_{g,f}``; head ``h``'s query for component ``i``
   is ``V_f^{-1}[g(h), i] q_{h,f}``. The ``p`` components that matter most keep RoPE in the shared key.
2. **NoPE.** The other components lose RoPE: head ``h`` then scores them with the *mean* rotation
   ``A_{h,f} = E[R(angle_s - angle_t)]`` under its calibrated attention (m2la) or with no rotation
   (baselines), folded into ``q_up``. Fast-rotating pairs average out, slow ones keep their score.
3. **Latent.** Features ``f = [k'_NoPE | v]`` are compressed to ``r`` dims. m2la weighs key directions
   by the (damped) query second moments times each head's output-per-score sensitivity (times
   ``key_weight``), and value directions by ``W_o^T W_o``, so the eigenvalues it drops model
   attention-output error. Token statistics are weighted by the attention each token receives
   (``attention_share``; sink tokens carry most of it and must be reconstructed best). Features are
   centered, the up-projection is refit by least squares, and the mean is restored by kv_b's bias.
4. **Refit** (m2la, on by default in the driver). With the latent fixed, the up-projections are refit
   per head by least squares on calibration statistics of what attention actually computes: the NoPE
   score map against the source scores with each (query, key) pair's true relative rotation, weighted
   by the source attention (:func:`key_refit_map`), and the value map against each head's
   attention-averaged values (:func:`value_refit_map`).

Shapes: ``K_f [P, G, G]`` key pair moments, ``V [P, G, G]``, ``cost [P, G]``, features ``[m, 2GD]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import M2LAConfig
from ..conversion import ConversionError, SourceAttention
from .stats import LayerStatistics

__all__ = [
    "METHODS",
    "VALUE_REFITS",
    "RopePlan",
    "LatentPlan",
    "rope_plan",
    "latent_plan",
    "key_refit_map",
    "value_refit_map",
    "fit_layer",
]

METHODS = ("m2la", "mha2mla", "transmla", "care")
_EPS = 1e-12


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConversionError(f"unknown compression method {method!r}; choose one of {', '.join(METHODS)}")


def _pair_columns(src: SourceAttention) -> tuple[torch.Tensor, torch.Tensor]:
    P = src.rotary_dim // 2
    j = torch.arange(P)
    if src.rope_interleaved:
        return 2 * j, 2 * j + 1
    return j, j + P


def check_compressible(src: SourceAttention) -> None:
    src.validate()
    if src.rotary_dim != src.head_dim:
        raise ConversionError(
            f"compressed conversion needs full-rotary heads; this layer rotates {src.rotary_dim} of {src.head_dim} dims"
        )


def _eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition (ascending) with denormals flushed: LAPACK slows ~100x on them."""
    torch.set_flush_denormal(True)
    try:
        return torch.linalg.eigh((m + m.T) / 2)
    finally:
        torch.set_flush_denormal(False)


def _sym_sqrt_pair(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``m^1/2`` and ``m^-1/2`` of a symmetric positive semi-definite matrix (one eigendecomposition)."""
    vals, vecs = _eigh(m)
    vals = vals.clamp_min(vals.max().clamp_min(_EPS) * 1e-10)
    return (vecs * vals.sqrt()) @ vecs.T, (vecs * vals.rsqrt()) @ vecs.T


# --- statistics per rotary pair ---------------------------------------------------------------------


def key_pair_moments(src: SourceAttention, stats: LayerStatistics) -> torch.Tensor:
    """``K_f[g, g'] = E[k_{g,f} . k_{g',f}]`` (both components summed): ``[P, G, G]``."""
    G, D = src.num_kv_heads, src.head_dim
    x_cols, y_cols = _pair_columns(src)
    moment = stats.z_second_moment[: G * D, : G * D].reshape(G, D, G, D)
    xx = moment[:, x_cols][:, :, :, x_cols]  # [G, P, G, P]
    yy = moment[:, y_cols][:, :, :, y_cols]
    P = x_cols.numel()
    idx = torch.arange(P)
    return (xx + yy)[:, idx, :, idx]  # [P, G, G]


def query_pair_energy(src: SourceAttention, stats: LayerStatistics) -> torch.Tensor:
    """``E|q_{h,f}|^2``: ``[H, P]``."""
    x_cols, y_cols = _pair_columns(src)
    diag = torch.diagonal(stats.query_second_moment, dim1=-2, dim2=-1)  # [H, D]
    return diag[:, x_cols] + diag[:, y_cols]


def score_sensitivity(src: SourceAttention, stats: LayerStatistics, key_weight: float) -> torch.Tensor:
    """Output error per unit of (unscaled) q.k error, per head: ``[H]``."""
    scale = src.softmax_scale * src.rope_scaling**2
    return stats.output_per_score_variance.clamp_min(0) * scale**2 * key_weight


# --- RoPE ---------------------------------------------------------------------------------------------


@dataclass
class RopePlan:
    """Per-frequency mixing of KV heads and which components keep RoPE."""

    transform: torch.Tensor  # [P, G, G]  V_f (rows = components)
    inverse: torch.Tensor  # [P, G, G]  V_f^{-1}
    cost: torch.Tensor  # [P, G]  error if the component loses RoPE (m2la: output-error units)
    order: torch.Tensor  # [P*G] flat component indices f*G + i, most important first

    def kept(self, num_pairs: int) -> torch.Tensor:
        """Flat indices of the kept components ``[p]``, in cache order."""
        return self.order[:num_pairs]

    def dropped_cost(self, num_pairs: int) -> float:
        return float(self.cost.flatten()[self.order[num_pairs:]].sum())


def rope_plan(src: SourceAttention, stats: LayerStatistics, method: str, key_weight: float = 1.0) -> RopePlan:
    """Choose each frequency's head mixing ``V_f`` and rank the components by their effect.

    - ``m2la``: score effect. ``V_f`` whitens by each KV group's damped query energy
      ``Q_g = sum_{h in g} s_h (1 - |E e^{i dtheta}|^2) / 2 E|q_{h,f}|^2`` then diagonalises
      ``Q^1/2 K_f Q^1/2``; the eigenvalue of a component is the output error of dropping its RoPE.
    - ``transmla`` / ``care``: RoRoPE, orthogonal PCA of ``K_f``, ranked by key energy.
    - ``mha2mla``: no mixing; pair ``(f, g)`` ranked by ``sum_h E|q_{h,f}| E|k_{g,f}|`` (2-norm).
    """
    _check_method(method)
    G, P = src.num_kv_heads, src.rotary_dim // 2
    K = key_pair_moments(src, stats)  # [P, G, G]
    group = torch.arange(src.num_heads) // src.group_size
    eye = torch.eye(G, dtype=torch.float64).expand(P, G, G)
    if method == "mha2mla":
        count = float(stats.tokens)
        q_norm = stats.q_pair_norm / count  # [H, P]
        k_norm = stats.k_pair_norm / count  # [G, P]
        q_group = torch.zeros(G, P, dtype=torch.float64).index_add_(0, group, q_norm)
        cost = (q_group * k_norm).T.contiguous()  # [P, G]
        transform, inverse = eye.clone(), eye.clone()
    elif method in ("transmla", "care"):
        vals, vecs = torch.linalg.eigh(K)  # ascending
        transform = vecs.transpose(1, 2).flip(1)  # rows = components, largest first
        inverse = transform.transpose(1, 2)
        cost = vals.flip(1).clamp_min(0)
    else:
        cos_mean, sin_mean = stats.mean_rotation  # [H, P]
        damping = (1 - (cos_mean.pow(2) + sin_mean.pow(2))).clamp(0, 1) / 2
        sens = score_sensitivity(src, stats, key_weight)  # [H]
        per_head = sens[:, None] * damping * query_pair_energy(src, stats)  # [H, P]
        q_group = torch.zeros(G, P, dtype=torch.float64).index_add_(0, group, per_head).T  # [P, G]
        q_group = q_group + q_group.mean(-1, keepdim=True).clamp_min(_EPS) * 1e-6
        root = q_group.sqrt()
        whitened = root[:, :, None] * K * root[:, None, :]
        vals, vecs = torch.linalg.eigh(whitened)
        vals, vecs = vals.flip(1).clamp_min(0), vecs.flip(2)
        transform = vecs.transpose(1, 2) * root[:, None, :]  # E^T Q^1/2
        inverse = vecs / root[:, :, None]  # Q^-1/2 E
        # rescale every component to the frequency's mean key energy (numerics of the cached key)
        energy = torch.einsum("fig,fgh,fih->fi", transform, K, transform).clamp_min(_EPS)
        target = torch.diagonal(K, dim1=1, dim2=2).mean(-1, keepdim=True).clamp_min(_EPS)
        scale = (target / energy).sqrt()  # [P, G]
        transform = transform * scale[:, :, None]
        inverse = inverse / scale[:, None, :]
        cost = vals
    order = torch.argsort(cost.flatten(), descending=True, stable=True)
    return RopePlan(transform=transform, inverse=inverse, cost=cost, order=order)


def _component_rows(
    src: SourceAttention, plan: RopePlan, components: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-feature rows of components (flat ``f*G + i``): x rows ``[c, GD]`` and y rows ``[c, GD]``."""
    G, D = src.num_kv_heads, src.head_dim
    x_cols, y_cols = _pair_columns(src)
    f, i = components // G, components % G
    coeff = plan.transform[f, i]  # [c, G]
    heads = torch.arange(G) * D
    rows_x = torch.zeros(components.numel(), G * D, dtype=torch.float64)
    rows_y = torch.zeros_like(rows_x)
    c = torch.arange(components.numel())[:, None]
    rows_x[c, heads[None] + x_cols[f][:, None]] = coeff
    rows_y[c, heads[None] + y_cols[f][:, None]] = coeff
    return rows_x, rows_y


@dataclass
class NopeLayout:
    """How the key components that lose RoPE are read back per head."""

    features: torch.Tensor  # [m + GD, 2GD]: z -> f = [k'_NoPE (m) | v (GD)]
    head_key: torch.Tensor  # [G, D, m]: k'_NoPE -> group g's NoPE key in head coordinates
    num_key_features: int  # m


def nope_layout(src: SourceAttention, plan: RopePlan, num_pairs: int) -> NopeLayout:
    G, D = src.num_kv_heads, src.head_dim
    x_cols, y_cols = _pair_columns(src)
    dropped = plan.order[num_pairs:]
    rows_x, rows_y = _component_rows(src, plan, dropped)
    m = 2 * dropped.numel()
    key_rows = torch.cat((rows_x, rows_y))  # [m, GD]
    features = torch.zeros(m + G * D, 2 * G * D, dtype=torch.float64)
    features[:m, : G * D] = key_rows
    features[m:, G * D :] = torch.eye(G * D, dtype=torch.float64)
    f, i = dropped // G, dropped % G
    c = dropped.numel()
    head_key = torch.zeros(G, D, m, dtype=torch.float64)
    if c:
        coeff = plan.inverse[f, :, i]  # [c, G]: V^-1[f, g, i]
        j = torch.arange(c)
        for g in range(G):
            head_key[g, x_cols[f], j] = coeff[:, g]
            head_key[g, y_cols[f], c + j] = coeff[:, g]
    return NopeLayout(features=features, head_key=head_key, num_key_features=m)


def nope_query_map(src: SourceAttention, stats: LayerStatistics, method: str) -> torch.Tensor:
    """Per-head ``[H, D, D]`` map from the source query to the NoPE query (mean rotation, transposed)."""
    H, D = src.num_heads, src.head_dim
    x_cols, y_cols = _pair_columns(src)
    gain = src.rope_scaling**2  # the source scales every rotated dim's score by the attention factor
    maps = torch.zeros(H, D, D, dtype=torch.float64)
    if method == "m2la":
        c, s = stats.mean_rotation  # [H, P]
    else:
        c, s = torch.ones(H, x_cols.numel(), dtype=torch.float64), torch.zeros(H, x_cols.numel(), dtype=torch.float64)
    h = torch.arange(H)[:, None]
    # q_nope = A^T q with A = [[c, -s], [s, c]]
    maps[h, x_cols, x_cols] = c * gain
    maps[h, x_cols, y_cols] = s * gain
    maps[h, y_cols, x_cols] = -s * gain
    maps[h, y_cols, y_cols] = c * gain
    return maps


# --- latent -------------------------------------------------------------------------------------------


def feature_weighting(
    src: SourceAttention, stats: LayerStatistics, layout: NopeLayout, query_map: torch.Tensor, key_weight: float
) -> torch.Tensor:
    """``[m + GD, m + GD]``: quadratic form turning a feature error into attention-output error."""
    H, G, D = src.num_heads, src.num_kv_heads, src.head_dim
    m = layout.num_key_features
    group = torch.arange(H) // src.group_size
    sens = score_sensitivity(src, stats, key_weight)
    q_second = stats.query_second_moment  # [H, D, D]
    nope_q = query_map @ q_second @ query_map.transpose(1, 2)  # [H, D, D]
    weight = torch.zeros(m + G * D, m + G * D, dtype=torch.float64)
    if m:
        reader = layout.head_key[group]  # [H, D, m]
        weight[:m, :m] = torch.einsum("h,hdm,hde,hen->mn", sens, reader, nope_q, reader)
    o_heads = src.o_weight.double().unflatten(1, (H, D))  # [d, H, D]
    per_head = torch.einsum("dhi,dhj->hij", o_heads, o_heads)  # [H, D, D]
    for g in range(G):
        block = per_head[group == g].sum(0)
        weight[m + g * D : m + (g + 1) * D, m + g * D : m + (g + 1) * D] = block
    return (weight + weight.T) / 2


@dataclass
class LatentPlan:
    encoder: torch.Tensor  # [r, m + GD]  features -> latent (uncentered)
    decoder: torch.Tensor  # [m + GD, r]
    bias: torch.Tensor  # [m + GD]      restored mean


def _m2la_moments(
    stats: LayerStatistics, layout: NopeLayout, attention_share: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[m + GD]`` and centered covariance of the features under m2la's token weighting."""
    mean, moment = stats.latent_moments(attention_share)
    F = layout.features
    cov = moment - torch.outer(mean, mean)
    return F @ mean, F @ cov @ F.T


def _latent_problem(
    src: SourceAttention,
    stats: LayerStatistics,
    layout: NopeLayout,
    method: str,
    key_weight: float,
    attention_share: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(matrix whose top eigenvectors span the latent, left map, right map): ``enc = E^T left``, ``dec = right E``."""
    F = layout.features
    m = layout.num_key_features
    if method == "m2la":
        query_map = nope_query_map(src, stats, method)
        weight = feature_weighting(src, stats, layout, query_map, key_weight)
        ridge = torch.diagonal(weight).mean().clamp_min(_EPS) * 1e-6
        weight = weight + ridge * torch.eye(weight.shape[0], dtype=torch.float64)
        root, root_inv = _sym_sqrt_pair(weight)
        _, cov = _m2la_moments(stats, layout, attention_share)
        return root @ cov @ root, root, root_inv
    eye = torch.eye(F.shape[0], dtype=torch.float64)
    if method == "mha2mla" and src.k_norm_weight is None:
        weights = F @ torch.cat((src.k_weight, src.v_weight)).double()  # [m + GD, d]
        return weights @ weights.T, eye, eye
    moment = F @ stats.z_second_moment @ F.T
    if method == "transmla" and m:
        key_energy = torch.diagonal(moment)[:m].sum().clamp_min(_EPS)
        value_energy = torch.diagonal(moment)[m:].sum().clamp_min(_EPS)
        balance = (key_energy / value_energy).sqrt()
        scale = torch.ones(F.shape[0], dtype=torch.float64)
        scale[:m] = 1 / balance
        return scale[:, None] * moment * scale[None, :], torch.diag(scale), torch.diag(1 / scale)
    return moment, eye, eye


def latent_spectrum(
    src: SourceAttention,
    stats: LayerStatistics,
    layout: NopeLayout,
    method: str,
    key_weight: float = 1.0,
    attention_share: float = 0.5,
) -> torch.Tensor:
    """Eigenvalues (descending) of the latent problem: the error each latent dim removes."""
    matrix, _, _ = _latent_problem(src, stats, layout, method, key_weight, attention_share)
    return _eigh(matrix)[0].flip(0).clamp_min(0)


def latent_plan(
    src: SourceAttention,
    stats: LayerStatistics,
    layout: NopeLayout,
    method: str,
    kv_rank: int,
    key_weight: float = 1.0,
    attention_share: float = 0.5,
) -> LatentPlan:
    dim = layout.features.shape[0]
    if not 1 <= kv_rank <= dim:
        raise ConversionError(f"kv_rank {kv_rank} out of range: this layer has {dim} compressible dims")
    matrix, left, right = _latent_problem(src, stats, layout, method, key_weight, attention_share)
    _, vecs = _eigh(matrix)
    top = vecs.flip(1)[:, :kv_rank]  # [dim, r]
    encoder = top.T @ left
    if method != "m2la":
        return LatentPlan(encoder=encoder, decoder=right @ top, bias=torch.zeros(dim, dtype=torch.float64))
    # least-squares refit of the up-projection on the centered features, mean restored as a bias
    mean, cov = _m2la_moments(stats, layout, attention_share)  # [dim], [dim, dim]
    cov_cc = encoder @ cov @ encoder.T
    cov_cc = cov_cc + torch.eye(kv_rank, dtype=torch.float64) * torch.diagonal(cov_cc).mean().clamp_min(_EPS) * 1e-9
    decoder = torch.linalg.solve(cov_cc, encoder @ cov).T  # cov_fc cov_cc^-1
    bias = mean - decoder @ (encoder @ mean)
    return LatentPlan(encoder=encoder, decoder=decoder, bias=bias)


# --- least-squares refit of the up-projections ------------------------------------------------------

VALUE_REFITS = ("output", "attended", "none")
_RIDGE = 1e-8  # relative ridge of the refit normal equations (1e-4 measured slightly worse, 1e-2 much worse)


def _augmented_encoder(layout: NopeLayout, latent: LatentPlan) -> torch.Tensor:
    """``[r + 1, 2GD + 1]``: ``[z | 1] -> [c | 1]`` (the latent the cache holds, plus a constant)."""
    enc = latent.encoder @ layout.features  # [r, 2GD]
    r, n = enc.shape
    out = torch.zeros(r + 1, n + 1, dtype=torch.float64)
    out[:r, :n] = enc
    out[r, n] = 1.0
    return out


def dropped_projector(plan: RopePlan, num_pairs: int) -> torch.Tensor:
    """``[P, G, G]``: per frequency, head coordinates -> the part carried by components that lose RoPE."""
    P, G, _ = plan.transform.shape
    mask = torch.zeros(P * G, dtype=torch.float64)
    mask[plan.order[num_pairs:]] = 1.0
    return torch.einsum("fgi,fi,fih->fgh", plan.inverse, mask.view(P, G), plan.transform)


def _key_target(src: SourceAttention, stats: LayerStatistics, plan: RopePlan, num_pairs: int) -> torch.Tensor:
    """``[H, D, 2GD + 1]``: ``sum_{t,s} p_ts R(angle_s - angle_t) k_dropped,s [z_s | 1]^T`` in head coordinates."""
    H, D = src.num_heads, src.head_dim
    group = torch.arange(H) // src.group_size
    x_cols, y_cols = _pair_columns(src)
    proj = dropped_projector(plan, num_pairs)[:, group]  # [P, H, G]
    rotation = stats.require_refit().key_rotation
    xc, xs = rotation[0], rotation[1]  # [H, P, G, 2, 2GD + 1]
    # R(angle) (x, y) = (cos x - sin y, sin x + cos y), summed over queries with C + iS = sum_t p e^{i angle}
    rows_x = torch.einsum("fhg,hfgi->hfi", proj, xc[:, :, :, 0] - xs[:, :, :, 1])
    rows_y = torch.einsum("fhg,hfgi->hfi", proj, xs[:, :, :, 0] + xc[:, :, :, 1])
    target = torch.zeros(H, D, xc.shape[-1], dtype=torch.float64)
    target[:, x_cols] = rows_x
    target[:, y_cols] = rows_y
    return target * src.rope_scaling**2


def _solve_rows(target: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``target gram^-1`` per head: ``[H, k, n] x [H, n, n]`` -> ``[H, k, n]`` (gram symmetric PSD, ridged)."""
    n = gram.shape[-1]
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1).clamp_min(_EPS)[:, None, None]
    gram = gram + _RIDGE * scale * torch.eye(n, dtype=torch.float64)
    return torch.linalg.solve(gram, target.transpose(1, 2)).transpose(1, 2)


def key_refit_map(
    src: SourceAttention, stats: LayerStatistics, plan: RopePlan, num_pairs: int, enc: torch.Tensor
) -> torch.Tensor:
    """Per-head NoPE score map ``B_h [H, D, r + 1]`` (query side of the score, refit by least squares).

    ``q_t^T B_h [c_s | 1]`` fits, over calibration (query, key) pairs weighted by the source attention
    ``p_ts``, the score the source gives the key dims that lose RoPE, ``q_t^T R(angle_s - angle_t)
    k_dropped,s``, with the *true* relative rotation of every pair rather than its mean:
    ``B_h = sum p R k_dropped [c | 1]^T (sum p [c | 1] [c | 1]^T)^-1`` (queries taken as independent of
    the key error, so no query metric is needed: ``B_h`` is unconstrained per head). It replaces both
    the mean-rotation query map and the key half of the least-squares decoder.
    """
    target = _key_target(src, stats, plan, num_pairs) @ enc.T  # [H, D, r + 1]
    gram = enc @ stats.require_refit().head_z_moment @ enc.T  # [H, r + 1, r + 1]
    return _solve_rows(target, gram)


def value_refit_map(src: SourceAttention, stats: LayerStatistics, enc: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-head value map ``[H, D, r + 1]`` from ``[c | 1]``, refit by least squares on calibration data.

    - ``"output"``: fits each head's attention-averaged value ``sum_s p_ts v_s`` (the attention output
      before ``W_o``, with the source probabilities) from the equally averaged latent;
    - ``"attended"``: fits every value, weighted by the attention it receives from that head.

    ``W_o`` follows linearly and the map is unconstrained per head, so its metric drops out.
    """
    if mode not in VALUE_REFITS or mode == "none":
        raise ConversionError(f"value refit must be one of {', '.join(VALUE_REFITS[:2])}, got {mode!r}")
    H, G, D = src.num_heads, src.num_kv_heads, src.head_dim
    group = torch.arange(H) // src.group_size
    refit = stats.require_refit()
    moment = refit.head_z_moment if mode == "attended" else refit.mixed_z_moment  # [H, n, n]
    rows = G * D + group[:, None] * D + torch.arange(D)[None]  # [H, D] value rows of each head's group
    target = torch.gather(moment, 1, rows[:, :, None].expand(H, D, moment.shape[-1])) @ enc.T
    gram = enc @ moment @ enc.T
    return _solve_rows(target, gram)


# --- assembly -----------------------------------------------------------------------------------------


def fit_layer(
    src: SourceAttention,
    stats: LayerStatistics,
    kv_rank: int,
    num_pairs: int,
    method: str = "m2la",
    key_weight: float = 1.0,
    attention_share: float = 0.5,
    key_refit: bool = False,
    value_refit: str = "none",
) -> tuple[M2LAConfig, dict[str, torch.Tensor]]:
    """Config and weights of a compressed :class:`~m2la.module.M2LAttention` (cache ``kv_rank + 2*num_pairs``).

    m2la only: ``key_refit`` refits the NoPE score map per head (:func:`key_refit_map`); ``value_refit``
    (``"output"``, ``"attended"`` or ``"none"``) refits the value up-projection per head
    (:func:`value_refit_map`). Both keep the encoder (the cache contents) as chosen by the weighted PCA.
    """
    _check_method(method)
    if value_refit not in VALUE_REFITS:
        raise ConversionError(f"value_refit must be one of {', '.join(VALUE_REFITS)}, got {value_refit!r}")
    check_compressible(src)
    H, G, D = src.num_heads, src.num_kv_heads, src.head_dim
    P = src.rotary_dim // 2
    if not 0 <= num_pairs <= G * P:
        raise ConversionError(f"rope_dim {2 * num_pairs} out of range: this layer has {2 * G * P} rotary key dims")
    plan = rope_plan(src, stats, method, key_weight)
    layout = nope_layout(src, plan, num_pairs)
    latent = latent_plan(src, stats, layout, method, kv_rank, key_weight, attention_share)
    m = layout.num_key_features
    p, r = num_pairs, kv_rank
    group = torch.arange(H) // src.group_size
    x_cols, y_cols = _pair_columns(src)
    kept = plan.kept(p)
    kept_f, kept_i = kept // G, kept % G
    qk_norm = src.k_norm_weight is not None
    dtype = src.q_weight.dtype

    # query: q_up[h] = [NoPE map (D rows) ; kept components (x half, y half)]
    q_up = torch.zeros(H, D + 2 * p, D, dtype=torch.float64)
    q_up[:, :D] = nope_query_map(src, stats, method)
    if p:
        coeff = plan.inverse[kept_f, :, kept_i][:, group].T  # [H, p]: V^-1[f, g(h), i]
        j = torch.arange(p)
        q_up[:, D + j, x_cols[kept_f]] = coeff
        q_up[:, D + p + j, y_cols[kept_f]] = coeff

    # kv: [latent ; rope key] = mix @ z,  z = [k_hat | v]
    rows_x, rows_y = _component_rows(src, plan, kept)
    rope_rows = torch.zeros(2 * p, 2 * G * D, dtype=torch.float64)
    rope_rows[:, : G * D] = torch.cat((rows_x, rows_y))
    mix = torch.cat((latent.encoder @ layout.features, rope_rows))  # [r + 2p, 2GD]

    # kv_b: per head [NoPE key (D) | value (D)] from the latent
    dec_k, dec_v = latent.decoder[:m], latent.decoder[m:]
    bias_k, bias_v = latent.bias[:m], latent.bias[m:]
    reader = layout.head_key[group]  # [H, D, m]
    w_key = reader @ dec_k if m else torch.zeros(H, D, r, dtype=torch.float64)
    w_val = dec_v.reshape(G, D, r)[group]
    b_key = reader @ bias_k if m else torch.zeros(H, D, dtype=torch.float64)
    b_val = bias_v.reshape(G, D)[group]
    if method == "m2la" and (key_refit or value_refit != "none"):
        enc = _augmented_encoder(layout, latent)
        if key_refit and m:
            fitted = key_refit_map(src, stats, plan, p, enc)
            w_key, b_key = fitted[:, :, :r], fitted[:, :, r]
            q_up[:, :D] = torch.eye(D, dtype=torch.float64)  # the fitted map already holds the rotation
        if value_refit != "none":
            fitted = value_refit_map(src, stats, enc, value_refit)
            w_val, b_val = fitted[:, :, :r], fitted[:, :, r]
    kv_b = torch.cat((w_key, w_val), dim=1).flatten(0, 1)  # [H*(2D), r]
    kv_b_bias = torch.cat((b_key, b_val), dim=1).flatten()

    has_kv_bias = src.k_bias is not None or src.v_bias is not None
    pair_freq = src.rope_inv_freq[kept_f]
    config = M2LAConfig(
        hidden_size=src.hidden_size,
        num_heads=H,
        kv_rank=r,
        rope_dim=2 * p,
        qk_nope_dim=D,
        v_head_dim=D,
        softmax_scale=float(src.softmax_scale),
        q_in_dim=D,
        query_norm=qk_norm,
        kv_in_dim=2 * G * D if qk_norm else None,
        key_norm_heads=G if qk_norm else 0,
        key_norm_dim=D if qk_norm else 0,
        norm_eps=float(src.norm_eps),
        q_bias=src.q_bias is not None,
        kv_a_bias=has_kv_bias,
        kv_b_bias=True,
        o_bias=src.o_bias is not None,
        rope_inv_freq=[float(x) for x in pair_freq],
        rope_axis=[int(a) for a in src.rope_axis[kept_f]],
        rope_source_column=[int(c) for c in src.rope_source_column[kept_f]],
        rope_scaling=float(src.rope_scaling),
    )
    kv_weight = torch.cat((src.k_weight, src.v_weight)).double()  # [2GD, d]
    kv_bias = None
    if has_kv_bias:
        zeros = torch.zeros(G * D, dtype=torch.float64)
        kv_bias = torch.cat(
            (
                src.k_bias.double() if src.k_bias is not None else zeros,
                src.v_bias.double() if src.v_bias is not None else zeros,
            )
        )
    state: dict[str, torch.Tensor] = {"q_proj.weight": src.q_weight, "o_proj.weight": src.o_weight, "q_up": q_up}
    if src.q_bias is not None:
        state["q_proj.bias"] = src.q_bias
    if src.o_bias is not None:
        state["o_proj.bias"] = src.o_bias
    if qk_norm:
        state["q_norm.weight"] = src.q_norm_weight
        state["key_norm.weight"] = src.k_norm_weight
        state["kv_a_proj.weight"] = kv_weight
        if kv_bias is not None:
            state["kv_a_proj.bias"] = kv_bias
        state["kv_a_mix.weight"] = mix
    else:
        state["kv_a_proj.weight"] = mix @ kv_weight
        if kv_bias is not None:
            state["kv_a_proj.bias"] = mix @ kv_bias
    state["kv_b_proj.weight"] = kv_b
    state["kv_b_proj.bias"] = kv_b_bias
    return config, {name: t.detach().to(dtype).clone() for name, t in state.items()}
