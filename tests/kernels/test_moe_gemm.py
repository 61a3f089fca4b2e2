"""The prefill experts kernels (kernels/moe_gemm.py) against dequantize-then-matmul, and their one promise beyond it:
an expert's rows come out the same bits alone, in a block table beside other experts, or from a stack.

On a CUDA GPU the tests run there; without one, when Triton is installed, under Triton's interpreter in a
subprocess (TRITON_INTERPRET=1), as tests/kernels/test_fused.py does.
"""

import importlib.util
import os

import pytest
import torch

from moe_offload.quant.hqq import QuantSpec

from kernel_helpers import expert_stack, run_under_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu" if INTERPRETED else None
on_device = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU or Triton's interpreter")
# (D, I): Mixtral's on the GPU; small ones under the (slow) interpreter, with I not a whole number of output tiles.
D, I = (4096, 14336) if DEVICE == "cuda" else (128, 192)
# The interpreter's bfloat16 tl.dot is wrong (Triton 3.9: off by 1e10); float16 runs the same kernel code.
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16
SPECS = [QuantSpec(2, 16, True), QuantSpec(3, 64, False), QuantSpec(4, 64, True), QuantSpec(2, 16, True, meta_bits=4)]


@pytest.mark.skipif(DEVICE is not None or importlib.util.find_spec("triton") is None,
                    reason="runs the tests below under Triton's interpreter when there is no GPU")
def test_moe_gemm_under_the_triton_interpreter():
    run_under_interpreter(__file__)


def activations(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, D, generator=g).to(DEVICE, DTYPE)


@on_device
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}bit-g{s.group_size}" + (f"-meta{s.meta_bits}" if s.quant_meta else ""))
@pytest.mark.parametrize("m", [2, 70])
def test_one_expert_matches_dequantize_then_matmul(spec, m):
    from moe_offload.kernels.moe_gemm import expert_rows, moe_gemm_reference

    _, _, experts = expert_stack(spec, 1, D, I, DEVICE)
    x = activations(m)
    got = expert_rows(x, *experts[0])
    want = moe_gemm_reference(x, *experts[0])
    assert got.shape == (m, D) and got.dtype == DTYPE
    # Both round the weights to x's dtype and the hidden units and outputs once; the sums' order differs.
    err = (got.float() - want.float()).abs().max()
    assert err <= 0.02 * want.float().abs().max(), err


@on_device
def test_route_blocks_cover_each_experts_pairs_in_order():
    from moe_offload.kernels.moe_gemm import route_blocks

    g = torch.Generator().manual_seed(3)
    e, k, t, bm = 6, 2, 40, 8
    indices = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(DEVICE)
    indices[:20] = torch.tensor([1, 4])  # one expert with several blocks, one with none
    order, blocks = route_blocks(indices, e, bm)
    flat = indices.reshape(-1).cpu()
    assert order.cpu().tolist() == sorted(range(t * k), key=lambda p: (int(flat[p]), p))
    assert blocks.shape == (t * k // bm + e, 3)
    seen = []
    for expert, first, count in blocks.cpu().tolist():
        assert 0 <= count <= bm
        if count:
            rows = order.cpu()[first : first + count]
            assert (flat[rows] == expert).all()
            seen += rows.tolist()
    assert sorted(seen) == list(range(t * k))


@on_device
@pytest.mark.parametrize("spec", SPECS[:2], ids=lambda s: f"{s.bits}bit-g{s.group_size}" + (f"-meta{s.meta_bits}" if s.quant_meta else ""))
def test_a_stacked_layer_in_two_launches_equals_its_experts_one_by_one(spec):
    """The resident stack's prefill (one block table, every expert) against each expert alone on its own rows (what
    an offloaded layer runs): the same bits, whatever the block boundaries."""
    from moe_offload.kernels.moe_gemm import BLOCK_PAIRS, expert_rows, route_blocks

    e, k, t = 4, 2, 3 * BLOCK_PAIRS // 2 + 5
    buffer, stride, experts = expert_stack(spec, e, D, I, DEVICE, seed=5)
    g = torch.Generator().manual_seed(7)
    indices = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(DEVICE)
    x = activations(t, seed=2)
    order, blocks = route_blocks(indices, e)
    y = expert_rows(x, *experts[0], out=torch.empty(t * k, D, dtype=x.dtype, device=DEVICE), blocks=blocks,
                    src=order // k, dst=order, pairs=t * k, stack_stride=stride)
    flat = indices.reshape(-1)
    for j in range(e):
        pairs = (flat == j).nonzero().reshape(-1)
        alone = expert_rows(x[pairs // k], *experts[j])
        assert torch.equal(y[pairs], alone), j
