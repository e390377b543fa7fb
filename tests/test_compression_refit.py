"""m2la's least-squares refit of the up-projections (fit.key_refit_map / fit.value_refit_map).

Each refit is checked against the objective it minimises, computed by brute force from the calibration
tokens themselves (not from the streamed statistics): the refit must be that objective's minimiser and
must do better on it than the un-refit fit (mean-rotation query map, per-token least-squares decoder).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from m2la.compression import fit  # noqa: E402
from m2la.compression.stats import LayerStatistics, accumulate, angles_cos_sin, source_projections  # noqa: E402
from m2la.conversion import ConversionError  # noqa: E402
from reference_gqa import random_source  # noqa: E402

RANK, PAIRS = 10, 4  # of 2 KV heads x 12 dims: 48 compressible dims, 12 rotary components


def _setup(bias: bool = False):
    src = random_source(bias=bias, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 20, src.hidden_size, generator=g, dtype=torch.float64)
    positions = torch.arange(20).expand(3, 20)
    cos, sin = angles_cos_sin(positions, src)
    stats = accumulate(LayerStatistics.zeros(src), src, hidden, cos, sin)
    return src, hidden, cos.double(), sin.double(), stats


def _source_probs(src, hidden, cos, sin):
    """Source attention ``[b, H, t, s]`` and the pre-RoPE ``q [b, t, H, D]``, ``k, v [b, s, G, D]``."""
    q, k, v = source_projections(src, hidden)
    P = src.rotary_dim // 2

    def rot(x):
        c, s = cos[:, :, None], sin[:, :, None]
        x1, x2 = x[..., :P], x[..., P:]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    kr = rot(k).repeat_interleave(src.group_size, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", rot(q), kr) * src.softmax_scale
    t = hidden.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return probs, q, k, v


def _latent(src, stats):
    plan = fit.rope_plan(src, stats, "m2la", 10.0)
    layout = fit.nope_layout(src, plan, PAIRS)
    latent = fit.latent_plan(src, stats, layout, "m2la", RANK, 10.0, 1.0)
    return plan, layout, latent


def _key_objective(src, hidden, cos, sin, plan, key_maps, solve=False):
    """``sum_h sum_{t,s} p_ts |B_h [c_s | 1] - R(a_s - a_t) k_dropped,h,s|^2`` from the tokens (brute force);
    with ``solve`` the per-head minimisers ``[H, D, r + 1]`` instead, by an explicit least squares."""
    probs, _, k, v = _source_probs(src, hidden, cos, sin)
    _, layout, latent = _latent(src, stats_of(src, hidden, cos, sin))
    z = torch.cat((k.flatten(-2), v.flatten(-2)), dim=-1)  # [b, s, 2GD]
    c1 = torch.cat((z @ (latent.encoder @ layout.features).T, torch.ones(z.shape[:-1] + (1,), dtype=z.dtype)), -1)
    proj = fit.dropped_projector(plan, PAIRS)  # [P, G, G]
    P = proj.shape[0]
    kx, ky = k[..., :P], k[..., P:]  # [b, s, G, P]
    dx = torch.einsum("fgh,bshf->bsgf", proj, kx)
    dy = torch.einsum("fgh,bshf->bsgf", proj, ky)
    angle_s = torch.atan2(sin, cos)  # [b, s, P]
    total, solutions = 0.0, []
    for h in range(src.num_heads):
        g = h // src.group_size
        rel = angle_s[:, None, :, :] - angle_s[:, :, None, :]  # [b, t, s, P]: a_s - a_t
        rc, rs = rel.cos(), rel.sin()
        tx = rc * dx[:, None, :, g] - rs * dy[:, None, :, g]  # [b, t, s, P]
        ty = rs * dx[:, None, :, g] + rc * dy[:, None, :, g]
        target = torch.cat((tx, ty), dim=-1)  # [b, t, s, D]
        if solve:
            w = probs[:, h]  # [b, t, s]
            cross = torch.einsum("bts,btsd,bsi->di", w, target, c1)
            gram = torch.einsum("bts,bsi,bsj->ij", w, c1, c1)
            solutions.append(torch.linalg.solve(gram, cross.T).T)
            continue
        fitted = c1 @ key_maps[h].T  # [b, s, D]
        err = (fitted[:, None] - target).pow(2).sum(-1)  # [b, t, s]
        total += float((probs[:, h] * err).sum())
    return torch.stack(solutions) if solve else total


def stats_of(src, hidden, cos, sin):
    return accumulate(LayerStatistics.zeros(src), src, hidden, cos.float(), sin.float())


def _value_objective(src, hidden, cos, sin, layout, latent, value_maps):
    """``sum_h sum_t |W_o,h (sum_s p_ts (V_h [c_s | 1] - v_s))|^2`` from the tokens (brute force)."""
    probs, _, k, v = _source_probs(src, hidden, cos, sin)
    z = torch.cat((k.flatten(-2), v.flatten(-2)), dim=-1)
    c1 = torch.cat((z @ (latent.encoder @ layout.features).T, torch.ones(z.shape[:-1] + (1,), dtype=z.dtype)), -1)
    H, D = src.num_heads, src.head_dim
    o_heads = src.o_weight.double().unflatten(1, (H, D))  # [d, H, D]
    total = 0.0
    for h in range(H):
        g = h // src.group_size
        err = c1 @ value_maps[h].T - v[:, :, g]  # [b, s, D]
        averaged = torch.einsum("bts,bsd->btd", probs[:, h], err)
        total += float((averaged @ o_heads[:, h].T).pow(2).sum())
    return total


def _unrefit_maps(src, stats, layout, latent):
    """The un-refit fit as ``[H, D, r + 1]`` maps: mean-rotation query map times the LS key decoder, and the
    LS value decoder (with their biases)."""
    H, G, D = src.num_heads, src.num_kv_heads, src.head_dim
    m = layout.num_key_features
    group = torch.arange(H) // src.group_size
    reader = layout.head_key[group]  # [H, D, m]
    key = torch.cat((reader @ latent.decoder[:m], (reader @ latent.bias[:m])[..., None]), -1)
    query_map = fit.nope_query_map(src, stats, "m2la")  # [H, D, D]: q_nope = A^T q, score q^T A k
    key = query_map.transpose(1, 2) @ key
    value = torch.cat((latent.decoder[m:].reshape(G, D, -1), latent.bias[m:].reshape(G, D, 1)), -1)[group]
    return key, value


def test_key_refit_minimises_the_attention_weighted_score_objective():
    src, hidden, cos, sin, stats = _setup()
    plan, layout, latent = _latent(src, stats)
    enc = fit._augmented_encoder(layout, latent)
    refit = fit.key_refit_map(src, stats, plan, PAIRS, enc)
    before, _ = _unrefit_maps(src, stats, layout, latent)
    j_refit = _key_objective(src, hidden, cos, sin, plan, refit)
    j_before = _key_objective(src, hidden, cos, sin, plan, before)
    assert j_refit < j_before
    # it is the minimiser: equal to an explicit least squares over every (query, key) pair ...
    explicit = _key_objective(src, hidden, cos, sin, plan, None, solve=True)
    torch.testing.assert_close(refit, explicit, rtol=1e-4, atol=1e-4 * float(explicit.abs().max()))
    # ... and any perturbation raises the objective
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        nudged = refit + 1e-2 * refit.abs().mean() * torch.randn(refit.shape, generator=g, dtype=refit.dtype)
        assert _key_objective(src, hidden, cos, sin, plan, nudged) > j_refit


@pytest.mark.parametrize("mode", ["output", "attended"])
def test_value_refit_lowers_the_attention_output_objective(mode):
    src, hidden, cos, sin, stats = _setup(bias=True)
    plan, layout, latent = _latent(src, stats)
    enc = fit._augmented_encoder(layout, latent)
    refit = fit.value_refit_map(src, stats, enc, mode)
    _, before = _unrefit_maps(src, stats, layout, latent)
    j_refit = _value_objective(src, hidden, cos, sin, layout, latent, refit)
    j_before = _value_objective(src, hidden, cos, sin, layout, latent, before)
    assert j_refit < j_before
    if mode == "output":  # the output refit is this objective's minimiser: an explicit least squares
        probs, _, k, v = _source_probs(src, hidden, cos, sin)
        z = torch.cat((k.flatten(-2), v.flatten(-2)), dim=-1)
        c1 = torch.cat((z @ (latent.encoder @ layout.features).T, torch.ones(z.shape[:-1] + (1,), dtype=z.dtype)), -1)
        explicit = []
        for h in range(src.num_heads):  # W_o,h has full column rank, so its metric drops out
            c_bar = torch.einsum("bts,bsi->bti", probs[:, h], c1).flatten(0, 1)
            v_bar = torch.einsum("bts,bsd->btd", probs[:, h], v[:, :, h // src.group_size]).flatten(0, 1)
            explicit.append(torch.linalg.solve(c_bar.T @ c_bar, c_bar.T @ v_bar).T)
        explicit = torch.stack(explicit)
        torch.testing.assert_close(refit, explicit, rtol=1e-4, atol=1e-4 * float(explicit.abs().max()))


def test_fit_layer_uses_the_refit_maps_and_checks_the_mode():
    src, hidden, cos, sin, stats = _setup()
    plain = fit.fit_layer(src, stats, RANK, PAIRS, "m2la", 10.0, 1.0)[1]
    refit = fit.fit_layer(src, stats, RANK, PAIRS, "m2la", 10.0, 1.0, key_refit=True, value_refit="output")[1]
    D = src.head_dim
    torch.testing.assert_close(refit["q_up"][:, :D], torch.eye(D, dtype=torch.float64).expand(src.num_heads, D, D))
    assert not torch.allclose(plain["kv_b_proj.weight"], refit["kv_b_proj.weight"])
    torch.testing.assert_close(plain["kv_a_proj.weight"], refit["kv_a_proj.weight"])  # same cache contents
    with pytest.raises(ConversionError):
        fit.fit_layer(src, stats, RANK, PAIRS, "m2la", value_refit="bogus")
