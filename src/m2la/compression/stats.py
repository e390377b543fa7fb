"""Second-moment statistics of one attention layer, accumulated batch by batch (bounded memory).

Everything a compressed conversion needs is a per-layer sum over calibration tokens:

- ``z = [k_hat | v]`` (``[b, t, 2GD]``): the pre-RoPE keys (after the key norm for QK-norm sources)
  and the values; their sum and uncentered second moment;
- per-head uncentered second moments of the pre-RoPE (normalised) queries ``[H, D, D]``;
- per-head, per-frequency mean norms of queries and keys (MHA2MLA's 2-norm RoPE selection);
- per-head, per-frequency mean relative rotation ``E[cos/sin(angle_s - angle_t)]`` under the source
  model's attention (mixed with uniform causal attention), used to replace RoPE by its mean rotation
  on the key dims that lose RoPE;
- per-head sensitivity of the attention output to score errors: ``sum_s p_ts^2 |u_s - u_bar_t|^2``
  with ``u_s = W_o,h v_s``, which converts score errors into output errors.
- for m2la's least-squares refit of the up-projections, per head: second moments of ``[z | 1]`` weighted
  by the attention each token receives from that head, of the attention-averaged ``[z | 1]``, and the
  cross moment of ``[z | 1]`` with the pre-RoPE key pairs rotated by the relative rotation each key is
  scored with (``sum_t p_ts e^{i(angle_s - angle_t)}``). These are ``O(H (2GD)^2)`` per layer, the
  largest sums kept (about 32 MB per SmolLM2-135M layer, 2.7 GB per Llama-3-8B layer, in fp64), so they
  live apart in :class:`RefitStatistics` and can be gathered a few layers at a time
  (:func:`accumulate_refit`, :func:`RefitStatistics.layer_bytes`).

Sums are float64; :func:`accumulate` adds one batch, :meth:`LayerStatistics.merge` adds two partial
sums, so statistics streamed batch by batch equal a one-shot computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .. import attention_math, rope
from ..conversion import ConversionError, SourceAttention

__all__ = [
    "LayerStatistics",
    "RefitStatistics",
    "accumulate",
    "accumulate_refit",
    "source_projections",
    "host_cos_sin_pairs",
]


@dataclass
class RefitStatistics:
    """Sums for m2la's least-squares refit of the up-projections (fit.key_refit_map, fit.value_refit_map).

    ``z1 = [z | 1]`` ``[2GD + 1]``, ``a_hs`` the attention key ``s`` receives from head ``h``,
    ``zbar_ht = sum_s p_hts z1_s``; all float64 on CPU.
    """

    head_z_moment: torch.Tensor  # [H, 2GD + 1, 2GD + 1]  sum_s a_hs z1_s z1_s^T
    mixed_z_moment: torch.Tensor  # [H, 2GD + 1, 2GD + 1]  sum_t zbar_ht zbar_ht^T
    key_rotation: torch.Tensor  # [2, H, P, G, 2, 2GD + 1]  sum_s (C|S)_hsf k_{s,g,f,x|y} z1_s
    #   with C_hsf + i S_hsf = sum_t p_hts e^{i(angle_s - angle_t)} (the rotation key s is scored with)

    @staticmethod
    def _shapes(src: SourceAttention) -> tuple[tuple[int, ...], ...]:
        H, G, D, P = src.num_heads, src.num_kv_heads, src.head_dim, src.rotary_dim // 2
        n = 2 * G * D + 1
        return (H, n, n), (H, n, n), (2, H, P, G, 2, n)

    @classmethod
    def zeros(cls, src: SourceAttention) -> RefitStatistics:
        return cls(*(torch.zeros(shape, dtype=torch.float64) for shape in cls._shapes(src)))

    @classmethod
    def layer_bytes(cls, src: SourceAttention) -> int:
        """Bytes one layer's sums take (what gathering them for one more layer at once costs)."""
        return sum(8 * math.prod(shape) for shape in cls._shapes(src))

    def merge(self, other: RefitStatistics) -> RefitStatistics:
        return RefitStatistics(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


@dataclass
class LayerStatistics:
    """Running sums over calibration tokens for one layer (all float64, on CPU)."""

    tokens: torch.Tensor  # [] weighted token count
    z_sum: torch.Tensor  # [2GD]
    z_moment: torch.Tensor  # [2GD, 2GD]  sum z z^T
    q_moment: torch.Tensor  # [H, D, D]   sum q q^T per head
    q_pair_norm: torch.Tensor  # [H, P]   sum |q_{h,f}|
    k_pair_norm: torch.Tensor  # [G, P]   sum |k_{g,f}|
    rotation_cos: torch.Tensor  # [H, P]  sum over queries of E_s[cos(angle_s - angle_t)]
    rotation_sin: torch.Tensor  # [H, P]  sum over queries of E_s[sin(angle_s - angle_t)]
    score_sensitivity: torch.Tensor  # [H] sum over queries of sum_s p_ts^2 |u_s - u_bar_t|^2
    output_energy: torch.Tensor  # [] sum over queries of |attention output (before o_proj bias)|^2
    attended_tokens: torch.Tensor  # [] sum of attention received (= weighted query count)
    attended_z_sum: torch.Tensor  # [2GD] sum of z weighted by the attention each token receives
    attended_z_moment: torch.Tensor  # [2GD, 2GD]
    refit: RefitStatistics | None = None  # m2la's up-projection refit sums; None when not gathered

    @classmethod
    def zeros(cls, src: SourceAttention, refit: bool = True) -> LayerStatistics:
        """Empty sums; ``refit=False`` leaves out the (large) refit sums, for passes that do not need them."""
        H, G, D = src.num_heads, src.num_kv_heads, src.head_dim
        P = src.rotary_dim // 2
        z = torch.zeros
        f64 = torch.float64
        return cls(
            tokens=z((), dtype=f64),
            z_sum=z(2 * G * D, dtype=f64),
            z_moment=z(2 * G * D, 2 * G * D, dtype=f64),
            q_moment=z(H, D, D, dtype=f64),
            q_pair_norm=z(H, P, dtype=f64),
            k_pair_norm=z(G, P, dtype=f64),
            rotation_cos=z(H, P, dtype=f64),
            rotation_sin=z(H, P, dtype=f64),
            score_sensitivity=z(H, dtype=f64),
            output_energy=z((), dtype=f64),
            attended_tokens=z((), dtype=f64),
            attended_z_sum=z(2 * G * D, dtype=f64),
            attended_z_moment=z(2 * G * D, 2 * G * D, dtype=f64),
            refit=RefitStatistics.zeros(src) if refit else None,
        )

    def merge(self, other: LayerStatistics) -> LayerStatistics:
        if (self.refit is None) != (other.refit is None):
            raise ConversionError("cannot merge statistics with and without refit sums")
        sums = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name != "refit"}
        return LayerStatistics(**sums, refit=None if self.refit is None else self.refit.merge(other.refit))

    def require_refit(self) -> RefitStatistics:
        if self.refit is None:
            raise ConversionError("this fit needs the refit statistics, which were not gathered for this layer")
        return self.refit

    # --- finalised quantities ------------------------------------------------------------------

    def _count(self) -> float:
        count = float(self.tokens)
        if count <= 0:
            raise ConversionError("no calibration tokens reached this layer (empty calibration or all padding)")
        return count

    @property
    def z_mean(self) -> torch.Tensor:  # [2GD]
        return self.z_sum / self._count()

    @property
    def z_second_moment(self) -> torch.Tensor:  # [2GD, 2GD], uncentered
        return self.z_moment / self._count()

    @property
    def z_covariance(self) -> torch.Tensor:  # [2GD, 2GD], centered
        mean = self.z_mean
        return self.z_second_moment - torch.outer(mean, mean)

    def latent_moments(self, attention_share: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``[2GD]`` and uncentered second moment ``[2GD, 2GD]`` of ``z`` under a token weighting mixing
        uniform tokens (``1 - attention_share``) with the attention each token receives (``attention_share``):
        what attention reads most (e.g. sink tokens) must be reconstructed best."""
        mean, moment = self.z_mean, self.z_second_moment
        if attention_share <= 0 or float(self.attended_tokens) <= 0:
            return mean, moment
        count = float(self.attended_tokens)
        a = attention_share
        return ((1 - a) * mean + a * self.attended_z_sum / count, (1 - a) * moment + a * self.attended_z_moment / count)

    @property
    def query_second_moment(self) -> torch.Tensor:  # [H, D, D]
        return self.q_moment / self._count()

    @property
    def mean_rotation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``E[cos(angle_s - angle_t)], E[sin(angle_s - angle_t)]``, each ``[H, P]``."""
        count = self._count()
        return self.rotation_cos / count, self.rotation_sin / count

    @property
    def mean_output_energy(self) -> float:
        return float(self.output_energy) / self._count()

    @property
    def output_per_score_variance(self) -> torch.Tensor:  # [H]
        return self.score_sensitivity / self._count()


def host_cos_sin_pairs(
    cos: torch.Tensor, sin: torch.Tensor, num_pairs: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host tables ``[b, t, 2P]`` (rotate-half layout) -> unscaled per-pair ``cos, sin [b, t, P]``."""
    return cos[..., :num_pairs] / scaling, sin[..., :num_pairs] / scaling


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def source_projections(src: SourceAttention, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden ``[b, t, d]`` -> pre-RoPE (normalised) ``q [b, t, H, D]``, ``k [b, t, G, D]``, ``v [b, t, G, D]``."""
    H, G, D = src.num_heads, src.num_kv_heads, src.head_dim

    def linear(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        out = hidden @ w.to(hidden.dtype).T
        return out if b is None else out + b.to(hidden.dtype)

    q = linear(src.q_weight, src.q_bias).unflatten(-1, (H, D))
    k = linear(src.k_weight, src.k_bias).unflatten(-1, (G, D))
    v = linear(src.v_weight, src.v_bias).unflatten(-1, (G, D))
    if src.q_norm_weight is not None:
        q = _rms(q, src.q_norm_weight.to(q.dtype), src.norm_eps)
        k = _rms(k, src.k_norm_weight.to(k.dtype), src.norm_eps)
    return q, k, v


def _pair_split(x: torch.Tensor, src: SourceAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., D]`` -> the x and y components of every rotary pair, each ``[..., P]``."""
    P = src.rotary_dim // 2
    if src.rope_interleaved:
        return x[..., 0 : 2 * P : 2], x[..., 1 : 2 * P : 2]
    return x[..., :P], x[..., P : 2 * P]


@dataclass
class _SourceBatch:
    """One batch through the source layer in fp32/fp64: what every statistic is computed from."""

    x: torch.Tensor  # [b, t, d] the attention input
    q: torch.Tensor  # [b, t, H, D] pre-RoPE (normalised) queries
    k: torch.Tensor  # [b, t, G, D] pre-RoPE (normalised) keys
    v: torch.Tensor  # [b, t, G, D]
    z: torch.Tensor  # [b, t, 2GD] float64: [k | v]
    weight: torch.Tensor  # [b, t] token weights (0 = padding)
    cos: torch.Tensor  # [b, t, P] unscaled per-pair angles
    sin: torch.Tensor  # [b, t, P]
    bias: torch.Tensor  # [b|1, 1|H, t, s] additive attention mask
    probs: torch.Tensor  # [b, H, t, s] source attention probabilities


def _source_batch(
    src: SourceAttention,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attention_mask: torch.Tensor | None,
    token_weight: torch.Tensor | None,
) -> _SourceBatch:
    H = src.num_heads
    b, t, _ = hidden.shape
    x = hidden if hidden.dtype == torch.float64 else hidden.float()  # fp64 in, fp64 throughout
    q, k, v = source_projections(src, x)  # [b, t, H|G, D]
    weight = torch.ones(b, t) if token_weight is None else token_weight.float().cpu()
    weight = weight.to(x.device, x.dtype)
    z = torch.cat((k.flatten(-2), v.flatten(-2)), dim=-1).double()  # [b, t, 2GD]

    # source attention probabilities (RoPE from the host's angles), to weigh distances and score errors
    cos = cos.to(x.dtype).expand(b, -1, -1)
    sin = sin.to(x.dtype).expand(b, -1, -1)
    qx, qy = _pair_split(q, src)
    kx, ky = _pair_split(k, src)
    rot_q = _rotate(qx, qy, cos[:, :, None], sin[:, :, None], src)
    rot_k = _rotate(kx, ky, cos[:, :, None], sin[:, :, None], src)
    rot_k = rot_k.repeat_interleave(src.group_size, dim=2)  # [b, t, H, D]
    scores = torch.einsum("bthd,bshd->bhts", rot_q, rot_k) * src.softmax_scale * src.rope_scaling**2
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[1] not in (1, H):
        mask = mask[:, :1]
    if mask is not None and mask.dim() == 4:
        mask = mask[..., -t:, -t:]
    bias = attention_math.attention_bias(mask, t, t, x.device, x.dtype)
    probs = torch.softmax(scores + bias, dim=-1).nan_to_num(0.0)  # [b, H, t, s]
    return _SourceBatch(x, q, k, v, z, weight, cos, sin, bias, probs)


@torch.no_grad()
def accumulate(
    stats: LayerStatistics,
    src: SourceAttention,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    uniform_mix: float = 0.25,
) -> LayerStatistics:
    """Add one batch to ``stats`` and return the new sums (the refit sums too when ``stats.refit`` is set).

    hidden ``[b, t, d]`` (the attention input); per-pair ``cos, sin [b|1, t, P]`` (unscaled angles of
    every source frequency, M-RoPE already resolved); ``attention_mask`` as the host passes it to
    attention (None = causal; see :func:`m2la.attention_math.attention_bias`); ``token_weight [b, t]``
    (0 for padding). ``uniform_mix`` mixes uniform causal attention into the distance distribution.
    """
    H, D = src.num_heads, src.head_dim
    batch = _source_batch(src, hidden, cos, sin, attention_mask, token_weight)
    x, q, v, z, weight, probs = batch.x, batch.q, batch.v, batch.z, batch.weight, batch.probs
    cos, sin = batch.cos, batch.sin
    w64 = weight.double()
    zw = z * w64[..., None]
    q64 = q.double()
    qx, qy = _pair_split(q, src)
    kx, ky = _pair_split(batch.k, src)
    q_norms = (qx.pow(2) + qy.pow(2)).sqrt().double()  # [b, t, H, P]
    k_norms = (kx.pow(2) + ky.pow(2)).sqrt().double()  # [b, t, G, P]

    allowed = torch.isfinite(batch.bias).to(x.dtype).expand_as(probs)
    uniform = allowed / allowed.sum(-1, keepdim=True).clamp_min(1.0)
    mixed = (1 - uniform_mix) * probs + uniform_mix * uniform

    # mean relative rotation per head and frequency: E_s[cos(a_s - a_t)], E_s[sin(a_s - a_t)]
    p_cos = torch.einsum("bhts,bsf->bhtf", mixed, cos)
    p_sin = torch.einsum("bhts,bsf->bhtf", mixed, sin)
    cos_t, sin_t = cos[:, None], sin[:, None]  # [b, 1, t, P]
    rel_cos = cos_t * p_cos + sin_t * p_sin
    rel_sin = cos_t * p_sin - sin_t * p_cos
    wq = weight[:, None, :, None].double()

    # output change per unit score-error variance: sum_s p^2 |u_s - u_bar_t|^2 with u = W_o,h v, computed in
    # head space through the Gram matrix O_h = W_o,h^T W_o,h  [H, D, D]
    o_heads = src.o_weight.to(x.device, x.dtype).unflatten(1, (H, D))  # [d, H, D]
    gram = torch.einsum("dhi,dhj->hij", o_heads, o_heads)
    v_heads = v.repeat_interleave(src.group_size, dim=2)  # [b, s, H, D]
    v_gram = torch.einsum("bshi,hij->bshj", v_heads, gram)
    p2 = probs.pow(2)
    v_bar = torch.einsum("bhts,bshd->bhtd", probs, v_heads)  # [b, H, t, D]
    term = torch.einsum("bhts,bsh->bht", p2, (v_gram * v_heads).sum(-1))
    # two steps: a three-operand einsum here built a [b, H, t, D, s] product (2.4 GB at 4 x 512 tokens)
    term = term - 2 * (p2 * torch.einsum("bhtd,bshd->bhts", v_bar, v_gram)).sum(-1)
    term = term + torch.einsum("bhti,hij,bhtj->bht", v_bar, gram, v_bar) * p2.sum(-1)  # [b, H, t]
    out = v_bar.permute(0, 2, 1, 3).flatten(-2) @ src.o_weight.to(x.device, x.dtype).T  # [b, t, d]
    out_energy = out.pow(2).sum(-1).double()  # [b, t]
    received = (probs * weight[:, None, :, None]).sum((1, 2)).double() / H  # [b, s] attention each key receives
    zr = z * received[..., None]
    refit = None
    if stats.refit is not None:
        refit = stats.refit.merge(_batch_refit(batch, src))

    return LayerStatistics(
        tokens=stats.tokens + w64.sum().cpu(),
        z_sum=stats.z_sum + zw.sum((0, 1)).cpu(),
        z_moment=stats.z_moment + torch.einsum("bti,btj->ij", zw, z).cpu(),
        q_moment=stats.q_moment + torch.einsum("bthi,bthj->hij", q64 * w64[..., None, None], q64).cpu(),
        q_pair_norm=stats.q_pair_norm + (q_norms * w64[..., None, None]).sum((0, 1)).cpu(),
        k_pair_norm=stats.k_pair_norm + (k_norms * w64[..., None, None]).sum((0, 1)).cpu(),
        rotation_cos=stats.rotation_cos + (rel_cos.double() * wq).sum((0, 2)).cpu(),
        rotation_sin=stats.rotation_sin + (rel_sin.double() * wq).sum((0, 2)).cpu(),
        score_sensitivity=stats.score_sensitivity + (term.double() * w64[:, None]).sum((0, 2)).cpu(),
        output_energy=stats.output_energy + (out_energy * w64).sum().cpu(),
        attended_tokens=stats.attended_tokens + received.sum().cpu(),
        attended_z_sum=stats.attended_z_sum + zr.sum((0, 1)).cpu(),
        attended_z_moment=stats.attended_z_moment + torch.einsum("bti,btj->ij", zr, z).cpu(),
        refit=refit,
    )


@torch.no_grad()
def accumulate_refit(
    refit: RefitStatistics,
    src: SourceAttention,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
) -> RefitStatistics:
    """Add one batch to the refit sums only (arguments as :func:`accumulate`); equals ``accumulate(...).refit``."""
    return refit.merge(_batch_refit(_source_batch(src, hidden, cos, sin, attention_mask, token_weight), src))


def _batch_refit(batch: _SourceBatch, src: SourceAttention) -> RefitStatistics:
    kx, ky = _pair_split(batch.k, src)
    return RefitStatistics(*_refit_moments(batch.probs, batch.weight, batch.z, batch.cos, batch.sin, kx, ky))


def _refit_moments(
    probs: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kx: torch.Tensor,
    ky: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch's ``head_z_moment``, ``mixed_z_moment`` and ``key_rotation`` (see :class:`RefitStatistics`).

    ``probs [b, H, t, s]`` source attention, ``weight [b, t]`` query weights, ``z [b, s, 2GD]`` (fp64),
    per-pair ``cos, sin [b, t, P]``, pre-RoPE key pairs ``kx, ky [b, s, G, P]``.
    """
    p = (probs * weight[:, None, :, None]).double()  # [b, H, t, s]
    z1 = torch.cat((z, z.new_ones(z.shape[:-1] + (1,))), dim=-1)  # [b, s, 2GD + 1]
    a = p.sum(2)  # [b, H, s]
    head = torch.einsum("bhs,bsi,bsj->hij", a, z1, z1)
    zbar = torch.einsum("bhts,bsi->bhti", probs.double(), z1)  # rows of padded queries carry weight 0 below
    mixed = torch.einsum("bhti,bt,bhtj->hij", zbar, weight.double(), zbar)
    c, s = cos.double(), sin.double()  # [b, t, P]
    pc = torch.einsum("bhts,btf->bhsf", p, c)
    ps = torch.einsum("bhts,btf->bhsf", p, s)
    c_rot = c[:, None] * pc + s[:, None] * ps  # sum_t p cos(angle_s - angle_t)  [b, H, s, P]
    s_rot = s[:, None] * pc - c[:, None] * ps  # sum_t p sin(angle_s - angle_t)
    keys = torch.stack((kx, ky), dim=-1).double()  # [b, s, G, P, 2]
    rot = torch.stack(
        (torch.einsum("bhsf,bsgfc,bsi->hfgci", c_rot, keys, z1), torch.einsum("bhsf,bsgfc,bsi->hfgci", s_rot, keys, z1))
    )
    return head.cpu(), mixed.cpu(), rot.cpu()


def _rotate(
    x1: torch.Tensor, x2: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, src: SourceAttention
) -> torch.Tensor:
    """Rotate pair components ``[..., P]`` and return the full ``[..., D]`` vector (pass dims dropped)."""
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    if src.rope_interleaved:
        return torch.stack((r1, r2), dim=-1).flatten(-2)
    return torch.cat((r1, r2), dim=-1)


def angles_cos_sin(positions: torch.Tensor, src: SourceAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair unscaled ``cos, sin [b, t, P]`` from positions ``[b, t]`` or ``[3, b, t]``."""
    angles = rope.rope_angles(positions, src.rope_inv_freq.double(), src.rope_axis)
    return angles.cos().float(), angles.sin().float()
