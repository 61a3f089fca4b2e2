"""Half-Quadratic Quantization (HQQ, Badri & Shaji 2023): reference quantizer and dequantizer.

Grouping and dequantization (the contract kernels implement):

* W is [N, K]; groups of G = ``spec.group_size`` consecutive elements run along K. Group m of row n
  covers W[n, m*G:(m+1)*G]; there are M = K/G groups per row.
* Codes q in [0, 2**bits) are packed per :mod:`moe_offload.quant.pack` into ``qweight`` int32
  [N, K*bits/32].
* ``w[n, k] = (q[n, k] - zero[n, k // G]) * scale[n, k // G]``, computed in float32 and cast to the
  output dtype at the end. ``zero`` is a float (HQQ does not round it) and may be fractional.
* Plain metadata (``quant_meta=False``): ``scale`` and ``zero`` are float16 [N, M].
* Quantized metadata (``quant_meta=True``, like the Mixtral-offloading demo's quant_scale/quant_zero):
  each of scale and zero is stored as ``{name}_q`` uint8 [N, M] plus ``{name}_step`` and
  ``{name}_offset`` float16 [N, M/B], where the block size B is the largest divisor of M that is
  <= 128 (blocks are consecutive along M within a row). Value:
  ``v[n, m] = float(q[n, m]) * float(step[n, m // B]) + float(offset[n, m // B])`` in float32.
  The encoder is round-to-nearest min-max per block, with ``offset`` rounded down and ``step``
  rounded up to float16 so the 256-level grid always spans the block's [min, max].
* 4-bit quantized metadata (``meta_bits=4``): as above with 16 levels, and one byte per group holds both
  codes: ``meta_q`` uint8 [N, M] with the scale's code in its low nibble and the zero's in its high one
  (so a kernel loads one byte where it loaded two, then masks or shifts). Step and offset stay
  ``{name}_step`` / ``{name}_offset``. A third fewer bytes than 8-bit metadata for 2-bit groups of 16.
* The weight codes are always chosen against the *stored* metadata (nearest grid point after the
  float16 / 8-bit rounding of scale and zero), so storage rounding costs as little as possible.

The quantizer: min-max init per group (working with the inverse scale, as HQQ does), then HQQ's
proximal solver refines the zero point: alternately round to codes, shrink the residual with the
generalized lp soft-threshold (p=0.7), and re-solve the zero in closed form; beta grows by kappa
each step. It stops when the mean abs error stops decreasing and keeps, per group, the best zero
seen. The scale is left at its min-max value (HQQ's default optimizer does the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from ..errors import MoeOffloadError
from .pack import SUPPORTED_BITS, pack, packed_words, unpack

# HQQ's default proximal-solver settings (hqq.core.optimize.optimize_weights_proximal).
LP_NORM = 0.7
BETA = 10.0
KAPPA = 1.01
ITERS = 20
# Min-max init guards, as in HQQ: a near-constant group gets a unit inverse scale, and the inverse
# scale is capped so the float16 scale stays representable.
_MIN_RANGE = 1e-4
_MAX_INV_SCALE = 2e4
_META_BLOCK_MAX = 128
META_BITS = (8, 4)


@dataclass(frozen=True, slots=True)
class QuantSpec:
    bits: int
    group_size: int
    quant_meta: bool = False
    meta_bits: int = 8  # bits of each quantized scale/zero code (8, or 4: both codes in one byte)

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise MoeOffloadError(f"bits={self.bits} is not supported; supported: {', '.join(map(str, SUPPORTED_BITS))}")
        g = self.group_size
        if not isinstance(g, int) or g < 8 or g & (g - 1):
            raise MoeOffloadError(f"group_size={g} must be a power of two >= 8")
        if self.meta_bits not in META_BITS:
            raise MoeOffloadError(f"meta_bits={self.meta_bits} is not supported; supported: 8, 4")
        if self.meta_bits != 8 and not self.quant_meta:
            raise MoeOffloadError(f"meta_bits={self.meta_bits} needs quantized metadata (quant_meta=True)")

    def check(self, k: int) -> None:
        """Raise unless K (in_features) can be stored with this spec."""
        packed_words(k, self.bits)  # K % 32 == 0
        if k % self.group_size:
            raise MoeOffloadError(f"group_size={self.group_size} must divide K={k} (in_features)")


def meta_block(m: int) -> int:
    """Block size for 8-bit metadata: the largest divisor of M (groups per row) that is <= 128."""
    return max(d for d in range(1, min(m, _META_BLOCK_MAX) + 1) if m % d == 0)


@dataclass(frozen=True, slots=True)
class QuantizedMeta:
    """A [N, M] metadata matrix stored as uint8 codes with a float16 step and offset per block.

    4-bit codes share their bytes with the other matrix's (scale: low nibble, shift 0; zero: high, shift 4)."""

    q: torch.Tensor  # uint8 [N, M]
    step: torch.Tensor  # float16 [N, M/B]
    offset: torch.Tensor  # float16 [N, M/B]
    bits: int = 8
    shift: int = 0

    def codes(self) -> torch.Tensor:
        """The codes as uint8 [N, M] (4-bit: this matrix's nibble of each byte)."""
        return self.q if self.bits == 8 else (self.q >> self.shift) & (2**self.bits - 1)


Meta = Union[torch.Tensor, QuantizedMeta]


def tensor_layout(shape: tuple[int, int], spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every stored tensor of an [N, K] matrix (what ``tensors()`` returns)."""
    n, k = shape
    spec.check(k)
    m = k // spec.group_size
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"qweight": ((n, packed_words(k, spec.bits)), torch.int32)}
    if spec.quant_meta and spec.meta_bits == 4:
        layout["meta_q"] = ((n, m), torch.uint8)  # both codes: scale low nibble, zero high nibble
    for name in ("scale", "zero"):
        if spec.quant_meta:
            blocks = m // meta_block(m)
            if spec.meta_bits == 8:
                layout[f"{name}_q"] = ((n, m), torch.uint8)
            layout[f"{name}_step"] = ((n, blocks), torch.float16)
            layout[f"{name}_offset"] = ((n, blocks), torch.float16)
        else:
            layout[name] = ((n, m), torch.float16)
    return layout


@dataclass
class QuantizedTensor:
    qweight: torch.Tensor  # int32 [N, K*bits/32]
    scale: Meta  # float16 [N, M] or QuantizedMeta
    zero: Meta
    shape: tuple[int, int]  # (N, K)
    spec: QuantSpec

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor under a flat name (see :func:`tensor_layout`), for serialization."""
        out = {"qweight": self.qweight}
        for name, meta in (("scale", self.scale), ("zero", self.zero)):
            if isinstance(meta, QuantizedMeta):
                out["meta_q" if meta.bits == 4 else f"{name}_q"] = meta.q
                out.update({f"{name}_step": meta.step, f"{name}_offset": meta.offset})
            else:
                out[name] = meta
        return out

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor], shape: tuple[int, int], spec: QuantSpec) -> "QuantizedTensor":
        """Rebuild from :meth:`tensors` output; checks names, shapes and dtypes against the layout."""
        shape = (int(shape[0]), int(shape[1]))
        layout = tensor_layout(shape, spec)
        if set(d) != set(layout):
            raise MoeOffloadError(f"quantized tensor {shape} {spec}: expected tensors {sorted(layout)}, got {sorted(d)}")
        for name, (want_shape, want_dtype) in layout.items():
            t = d[name]
            if tuple(t.shape) != want_shape or t.dtype != want_dtype:
                raise MoeOffloadError(
                    f"quantized tensor {name!r}: expected {want_dtype} {list(want_shape)}, got {t.dtype} {list(t.shape)}"
                )
        return cls.assemble(d, shape, spec)

    @classmethod
    def assemble(cls, d: dict[str, torch.Tensor], shape: tuple[int, int], spec: QuantSpec) -> "QuantizedTensor":
        """Like :meth:`from_tensors` without the checks, for hot paths over already-validated tensors."""

        def meta(name: str, shift: int) -> Meta:
            if spec.quant_meta and spec.meta_bits == 4:
                return QuantizedMeta(d["meta_q"], d[f"{name}_step"], d[f"{name}_offset"], 4, shift)
            if spec.quant_meta:
                return QuantizedMeta(d[f"{name}_q"], d[f"{name}_step"], d[f"{name}_offset"])
            return d[name]

        return cls(d["qweight"], meta("scale", 0), meta("zero", 4), shape, spec)

    def rows(self, start: int, stop: int) -> "QuantizedTensor":
        """Rows [start, stop) of the matrix (output features): views, no copies. Every stored tensor is row-major
        with one row per output feature, so a row range of each is a contiguous slice."""
        sliced = {name: t[start:stop] for name, t in self.tensors().items()}
        return QuantizedTensor.assemble(sliced, (stop - start, self.shape[1]), self.spec)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "QuantizedTensor":
        moved = {name: t.to(device, non_blocking=non_blocking) for name, t in self.tensors().items()}
        return QuantizedTensor.from_tensors(moved, self.shape, self.spec)


def _f16_round(x: torch.Tensor, direction: float) -> torch.Tensor:
    """float32 -> nearest float16 on the side of ``direction`` (+inf: >= x, -inf: <= x)."""
    h = x.to(torch.float16)
    wrong = h.float() < x if direction > 0 else h.float() > x
    return torch.where(wrong, torch.nextafter(h, torch.full_like(h, direction)), h)


def _quantize_meta(v: torch.Tensor, bits: int = 8) -> QuantizedMeta:
    """Min-max quantization of a float32 [N, M] metadata matrix to ``bits``-bit codes in blocks along M
    (codes one per byte; :func:`quantize` packs two 4-bit ones into a byte)."""
    n, m = v.shape
    levels = float(2**bits - 1)
    vb = v.reshape(n, m // meta_block(m), -1)
    offset = _f16_round(vb.amin(dim=-1), float("-inf"))
    step = _f16_round((vb.amax(dim=-1) - offset.float()) / levels, float("inf"))
    step = torch.where(step == 0, torch.ones_like(step), step)  # constant block: any step is exact
    q = torch.round((vb - offset.float()[..., None]) / step.float()[..., None]).clamp_(0, levels)
    return QuantizedMeta(q.to(torch.uint8).reshape(n, m), step, offset)


def share_byte(scale_codes: torch.Tensor, zero_codes: torch.Tensor) -> torch.Tensor:
    """4-bit scale and zero codes (uint8 [N, M], one per byte) -> ``meta_q``: the scale's low nibble, the zero's high."""
    return scale_codes | (zero_codes << 4)


def _share_byte(scale: QuantizedMeta, zero: QuantizedMeta) -> tuple[QuantizedMeta, QuantizedMeta]:
    """Two 4-bit code matrices -> one byte per group, shared by both."""
    q = share_byte(scale.q, zero.q)
    return QuantizedMeta(q, scale.step, scale.offset, 4, 0), QuantizedMeta(q, zero.step, zero.offset, 4, 4)


def dequantize_meta(meta: Meta) -> torch.Tensor:
    """Stored scale or zero -> float32 [N, M]."""
    if not isinstance(meta, QuantizedMeta):
        return meta.float()
    n, m = meta.q.shape
    q = meta.codes().float().reshape(n, meta.step.shape[1], -1)
    return (q * meta.step.float()[..., None] + meta.offset.float()[..., None]).reshape(n, m)


def _shrink_lp(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized soft-threshold for the lp (p<1) penalty: sign(x) * max(|x| - |x|^(p-1)/beta, 0)."""
    a = x.abs()
    # |x|^(p-1) is inf at 0, so the threshold clamps those entries to 0, as wanted.
    return torch.sign(x) * (a - a.pow(LP_NORM - 1) / beta).clamp_min_(0.0)


def _optimize_zero(w: torch.Tensor, inv_scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """HQQ proximal solver for the zero point. w: [N, M, G] float32; inv_scale, zero: [N, M, 1]."""
    beta = BETA
    best_zero = zero
    best_group_err = torch.full_like(zero, float("inf"))
    best_total = float("inf")
    for _ in range(ITERS):
        wq = torch.round(w * inv_scale + zero).clamp_(0, qmax)
        residual = w - (wq - zero) / inv_scale
        group_err = residual.abs().mean(dim=-1, keepdim=True)
        # Keep each group's best zero: groups evolve independently, so this never loses to a global pick.
        better = group_err < best_group_err
        best_zero = torch.where(better, zero, best_zero)
        best_group_err = torch.where(better, group_err, best_group_err)
        total = float(group_err.mean())  # equal-size groups: this is the matrix's mean abs error
        if total >= best_total:
            break
        best_total = total
        # Closed-form zero for the shrunk residual: argmin_z ||wq - (w - e) * s - z||^2 per group.
        e = _shrink_lp(residual, beta)
        zero = torch.mean(wq - (w - e) * inv_scale, dim=-1, keepdim=True)
        beta *= KAPPA
    return best_zero


@torch.no_grad()
def quantize(w: torch.Tensor, spec: QuantSpec, *, optimize: bool = True) -> QuantizedTensor:
    """Quantize a float [N, K] weight with HQQ (``optimize=False``: plain min-max round-to-nearest).

    Computes in float32 on ``w``'s device; the result lives on the same device.
    """
    if w.dim() != 2 or not w.dtype.is_floating_point:
        raise MoeOffloadError(f"quantize expects a floating [N, K] weight, got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    spec.check(k)
    if not bool(torch.isfinite(w).all()):
        raise MoeOffloadError(f"weight {tuple(w.shape)} has NaN or inf values; cannot quantize")
    qmax = 2**spec.bits - 1
    wg = w.to(torch.float32).reshape(n, k // spec.group_size, spec.group_size)

    # Min-max init on the inverse scale: q = round(w * inv_scale + zero).
    lo = wg.amin(dim=-1, keepdim=True)
    hi = wg.amax(dim=-1, keepdim=True)
    span = hi - lo
    inv_scale = torch.where(span <= _MIN_RANGE, torch.ones_like(span), qmax / span).clamp_(max=_MAX_INV_SCALE)
    zero = -lo * inv_scale
    if optimize:
        zero = _optimize_zero(wg, inv_scale, zero, qmax)

    scale32, zero32 = (1.0 / inv_scale).squeeze(-1), zero.squeeze(-1)
    if spec.quant_meta:
        scale, zero_st = _quantize_meta(scale32, spec.meta_bits), _quantize_meta(zero32, spec.meta_bits)
        if spec.meta_bits == 4:
            scale, zero_st = _share_byte(scale, zero_st)
    else:
        scale, zero_st = scale32.to(torch.float16), zero32.to(torch.float16)

    # Codes against the stored metadata: the nearest point of the grid the dequantizer will use.
    s, z = dequantize_meta(scale)[..., None], dequantize_meta(zero_st)[..., None]
    if not bool(torch.isfinite(s).all() & torch.isfinite(z).all()):
        # Only for groups far from zero with a tiny range (never seen in LLM linear layers).
        raise MoeOffloadError(f"weight {tuple(w.shape)}: scale or zero point overflows float16; cannot quantize")
    codes = torch.round(wg / s + z).clamp_(0, qmax).to(torch.uint8).reshape(n, k)
    return QuantizedTensor(pack(codes, spec.bits), scale, zero_st, (n, k), spec)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantization -> [N, K] in ``dtype`` (math in float32)."""
    n, k = qt.shape
    g = qt.spec.group_size
    codes = unpack(qt.qweight, qt.spec.bits, k).reshape(n, k // g, g).float()
    scale = dequantize_meta(qt.scale)[..., None]
    zero = dequantize_meta(qt.zero)[..., None]
    return ((codes - zero) * scale).reshape(n, k).to(dtype)
