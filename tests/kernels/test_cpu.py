"""The CPU expert kernels against a float64 dequantize-then-multiply reference."""

import pytest
import torch

from moe_offload.errors import MoeOffloadError
from moe_offload.kernels import cpu
from moe_offload.quant.hqq import QuantSpec, dequantize, quantize

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"no CPU kernel: {cpu.unavailable_reason()}")

LEAN = QuantSpec(2, 16, True, meta_bits=4)  # the 4/2-lean preset's experts: both metadata codes in one byte
SPECS = [QuantSpec(2, 16, True), QuantSpec(2, 32), QuantSpec(3, 64), QuantSpec(4, 64), QuantSpec(8, 64),
         QuantSpec(4, 128, True), QuantSpec(3, 16, True), LEAN, QuantSpec(4, 64, True, meta_bits=4)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("shape", [(64, 512), (1024, 4096), (4096, 1024), (48, 96)])
def test_hqq_kernel_matches_reference(spec, shape):
    n, k = shape
    if k % spec.group_size:
        pytest.skip("group does not divide K")
    torch.manual_seed(n + k + spec.bits)
    qt = quantize(torch.randn(n, k), spec, optimize=False)
    x = torch.randn(k)
    ref = cpu.hqq_matvec_reference(x, qt).double()
    got = cpu.CpuMatrix(qt, int8_activations=False).matvec(x, threads=2).double()
    # float32 accumulation over K terms against a float64 reference
    assert (got - ref).abs().max() <= 1e-5 * k ** 0.5 * ref.abs().max()


needs_int8 = pytest.mark.skipif(not cpu.available() or not cpu.int8_available(), reason="no AVX2 build")


@needs_int8
@pytest.mark.parametrize("simd", ["auto", "avx2"])
@pytest.mark.parametrize("spec", [QuantSpec(2, 16, True), QuantSpec(2, 16), LEAN], ids=str)
@pytest.mark.parametrize("shape", [(64, 512), (1024, 4096), (256, 14336), (48, 384)])
def test_int8_fast_path(spec, shape, simd):
    """The integer path is exact given its int8-rounded x, and off from the float product by at most what
    that rounding can move: sum_k |W[n, k]| |x_k - x8_k dx|. "auto" takes the 512-bit path where the CPU has
    AVX-512 VNNI and K allows it (K = 384 does not: it falls back to 256-bit loads)."""
    n, k = shape
    torch.manual_seed(n + k)
    qt = quantize(torch.randn(n, k), spec, optimize=False)
    x = torch.randn(k) * torch.linspace(0.1, 3.0, k)  # uneven magnitudes across groups
    matrix = cpu.CpuMatrix(qt, simd=simd)
    assert matrix.int8 and cpu.int8_path(qt)
    assert matrix.chunk == cpu.chunk_width(qt, simd)
    q = cpu.QuantizedVector(x, matrix.chunk)
    xq = q.dequantized()
    assert (xq - x).abs().max() <= x.abs().max() / 127  # half a step of the largest group, at most
    got = matrix.matvec(x, threads=2).double()
    assert torch.equal(got.float(), matrix.matvec(q, threads=2))  # rounding once or per call: the same
    exact_given_xq = cpu.hqq_matvec_reference(xq, qt).double()
    assert (got - exact_given_xq).abs().max() <= 1e-5 * k ** 0.5 * exact_given_xq.abs().max()
    w = dequantize(qt, torch.float64)
    bound = w.abs() @ (x.double() - xq.double()).abs()
    ref = cpu.hqq_matvec_reference(x, qt).double()
    assert ((got - ref).abs() <= bound * 1.001 + 1e-4).all()
    assert (got - ref).norm() / ref.norm() < 1e-2


@needs_int8
def test_quantized_vector_layouts_agree():
    """The 128- and 256-code permutations hold the same int8 values, steps and sums (the 256 one is what the
    512-bit path reads; its layout is checked here on any CPU)."""
    x = torch.randn(4096) * torch.linspace(0.1, 3.0, 4096)
    a, b = cpu.QuantizedVector(x, 128), cpu.QuantizedVector(x, 256)
    assert torch.equal(a.dx, b.dx) and torch.equal(a.xs, b.xs)
    assert torch.equal(a.dequantized(), b.dequantized())
    assert not torch.equal(a.xp, b.xp)


@needs_int8
def test_int8_path_needs_its_layout():
    assert not cpu.int8_path(quantize(torch.randn(16, 512), QuantSpec(2, 32)))  # group 32
    assert not cpu.int8_path(quantize(torch.randn(16, 1600), QuantSpec(2, 16)))  # K % 128
    # 136 groups: 8-bit metadata in blocks of 68 groups, not a multiple of 8
    assert not cpu.int8_path(quantize(torch.randn(16, 2176), QuantSpec(2, 16, True)))
    with pytest.raises(MoeOffloadError, match="int8 activations"):
        cpu.CpuMatrix(quantize(torch.randn(16, 512), QuantSpec(4, 64)), int8_activations=True)


def test_hqq_kernel_rejects_unsupported_shapes():
    qt = quantize(torch.randn(40, 64), QuantSpec(2, 16))  # 40 rows: not a multiple of 16
    with pytest.raises(MoeOffloadError, match="N % 16"):
        cpu.CpuMatrix(qt)
    qt = quantize(torch.randn(64, 64), QuantSpec(4, 64))
    with pytest.raises(MoeOffloadError, match="float32 CPU vector of 64"):
        cpu.CpuMatrix(qt).matvec(torch.randn(32), threads=1)


@pytest.mark.parametrize("spec", [QuantSpec(2, 32), QuantSpec(3, 64), QuantSpec(4, 64), QuantSpec(4, 128, True)], ids=str)
def test_int4_conversion_is_exact(spec):
    """HQQ's (q - z) * s as torch's int4 form (q - 8) * s + (8 - z) * s: in float32, the product equals the
    dequantized matrix's up to float32 rounding; bfloat16 (the fast path) within bfloat16 tolerance."""
    torch.manual_seed(spec.bits)
    qt = quantize(torch.randn(256, 512), spec, optimize=False)
    x = torch.randn(512)
    ref = (dequantize(qt, torch.float64) @ x.double())
    exact = cpu.Int4Matrix(qt, torch.float32).matvec(x, threads=1).double()
    assert (exact - ref).abs().max() <= 1e-5 * ref.abs().max()
    fast = cpu.Int4Matrix(qt).matvec(x, threads=1).double()
    assert (fast - ref).abs().max() <= 3e-2 * ref.abs().max()


def test_int4_rejects_group_16():
    with pytest.raises(MoeOffloadError, match="groups of"):
        cpu.Int4Matrix(quantize(torch.randn(32, 64), QuantSpec(2, 16, True)))


@needs_int8
@pytest.mark.parametrize("simd", ["auto", "avx2"])
@pytest.mark.parametrize("n,spec", [(1, QuantSpec(2, 16, True)), (3, QuantSpec(2, 16, True)), (3, LEAN)], ids=str)
def test_fused_experts_match_matrix_by_matrix(n, spec, simd):
    """One C call for a layer's experts (gate, up, SiLU, h rounded to int8, down) against the same experts matrix by
    matrix, and against float64 with dequantized weights (the SwiGLU reference)."""
    d, i = 256, 768
    torch.manual_seed(n)
    mats = [[cpu.CpuMatrix(quantize(torch.randn(*shape) * 0.5, spec, optimize=False), simd=simd)
             for shape in ((i, d), (i, d), (d, i))] for _ in range(n)]
    gates, ups, downs = (list(t) for t in zip(*mats))
    assert cpu.fusable(gates, ups, downs)
    x = torch.randn(d)
    got = cpu.experts_2bit_g16(gates, ups, downs, x, threads=2)
    assert got.shape == (n, d)
    for e, (gate, up, down) in enumerate(mats):
        q = cpu.QuantizedVector(x, gate.chunk)
        h = torch.nn.functional.silu(gate.matvec(q, 2)) * up.matvec(q, 2)
        one = down.matvec(h, 2)
        assert (got[e] - one).norm() / one.norm() < 1e-3  # expf vs torch's SiLU may move an int8 rounding of h
        w = [dequantize(m.qt, torch.float64) for m in (gate, up, down)]
        xd = x.double()
        ref = w[2] @ (torch.nn.functional.silu(w[0] @ xd) * (w[1] @ xd))
        assert (got[e].double() - ref).norm() / ref.norm() < 2e-2


@needs_int8
def test_fused_experts_refuse_other_layouts():
    spec = QuantSpec(2, 16, True)
    gate, up = (cpu.CpuMatrix(quantize(torch.randn(768, 256), spec)) for _ in range(2))
    down = cpu.CpuMatrix(quantize(torch.randn(256, 768), QuantSpec(4, 64)))  # not on the integer path
    assert not cpu.fusable([gate], [up], [down])
    with pytest.raises(MoeOffloadError, match="2-bit group-16"):
        cpu.experts_2bit_g16([gate], [up], [down], torch.randn(256), threads=1)


@needs_int8
@pytest.mark.parametrize("rows", [256, 768])
def test_fused_gate_up_heads_match_matrix_by_matrix(rows):
    """gate_up_2bit_g16 (the CPU's share of split experts: the first rows of gate and up, SiLU, no down) against the
    same row-prefix matrices one by one, and against float64 over the full matrices' first rows."""
    d, i = 256, 768
    torch.manual_seed(rows)
    spec = QuantSpec(2, 16, True)
    full = [[quantize(torch.randn(i, d) * 0.5, spec, optimize=False) for _ in range(2)] for _ in range(2)]
    heads = [[cpu.CpuMatrix(qt.rows(0, rows)) for qt in pair] for pair in full]
    gates, ups = [h[0] for h in heads], [h[1] for h in heads]
    assert cpu.fusable(gates, ups, None)
    x = torch.randn(d)
    got = cpu.gate_up_2bit_g16(gates, ups, x, threads=2)
    assert got.shape == (2, rows)
    for e, (gate, up) in enumerate(heads):
        q = cpu.QuantizedVector(x, gate.chunk)
        one = torch.nn.functional.silu(gate.matvec(q, 2)) * up.matvec(q, 2)
        torch.testing.assert_close(got[e], one, rtol=1e-5, atol=1e-5)
        w = [dequantize(qt, torch.float64)[:rows] for qt in full[e]]
        ref = torch.nn.functional.silu(w[0] @ x.double()) * (w[1] @ x.double())
        assert (got[e].double() - ref).norm() / ref.norm() < 2e-2


@needs_int8
def test_started_on_the_kernels_thread_equals_the_direct_call():
    d, i = 256, 512
    torch.manual_seed(5)
    spec = QuantSpec(2, 16, True)
    mats = [[cpu.CpuMatrix(quantize(torch.randn(*shape) * 0.5, spec, optimize=False))
             for shape in ((i, d), (i, d), (d, i))] for _ in range(2)]
    gates, ups, downs = (list(t) for t in zip(*mats))
    x = torch.randn(d)
    job = cpu.start(gates, ups, downs, x, threads=2)
    heads = cpu.start(gates, ups, None, x, threads=2)  # waits for the first job before it starts
    y, ms = job.wait()
    h, ms_h = heads.wait()
    assert torch.equal(y, cpu.experts_2bit_g16(gates, ups, downs, x, threads=2)) and ms >= 0
    assert torch.equal(h, cpu.gate_up_2bit_g16(gates, ups, x, threads=2)) and ms_h >= 0


def _serve(server: cpu.LayerServer, layer: int, x: torch.Tensor, routed: list[int], guess: int = -1) -> None:
    """Play the GPU stream for one CPU layer: the mailbox, cleared answers, go; then wait for done."""
    import time

    d, k = server.hidden, server.top_k
    server.mail[layer, :d] = x
    server.mail[layer].view(torch.int32)[d:] = torch.tensor(routed + [guess], dtype=torch.int32)
    server.copied[layer] = 0
    server.done[layer] = 0
    server.go[layer] = 1
    deadline = time.monotonic() + 30
    while int(server.done[layer]) != 1:
        assert time.monotonic() < deadline, "the layer server did not answer"
        time.sleep(0)
    assert k - server.cpu_k == 0 or int(server.copied[layer]) == 1


@needs_int8
def test_the_layer_server_follows_its_protocol():
    """The C layer server (no CUDA: memcpy into host "slots"): the plan puts the heaviest ranks on the GPU, an expert
    copied ahead on a guess first (and not copied again); the slots receive the experts' bytes; the CPU's outputs equal
    experts_2bit_g16 on the same experts."""
    d, i, layers, experts, top_k = 256, 512, 2, 4, 3
    torch.manual_seed(7)
    spec = QuantSpec(2, 16, True)
    buffers = [[torch.randint(0, 255, (64,), dtype=torch.uint8) for _ in range(experts)] for _ in range(layers)]
    mats = [[tuple(cpu.CpuMatrix(quantize(torch.randn(*shape) * 0.5, spec, optimize=False))
                   for shape in ((i, d), (i, d), (d, i))) for _ in range(experts)] for _ in range(layers)]
    slots = [torch.zeros(64, dtype=torch.uint8) for _ in range(2)]  # gpu_k = 1: one slot per parity
    server = cpu.LayerServer(mats, [[b.data_ptr() for b in layer] for layer in buffers], 64,
                             [s.data_ptr() for s in slots], top_k=top_k, cpu_k=2, parity=[0, 1], next_layer=[1, -1],
                             threads=2, guess=True)
    server.start()
    try:
        x = torch.randn(d)
        _serve(server, 0, x, [3, 1, 2], guess=2)  # the GPU takes rank 0 (expert 3); expert 2 of layer 1 goes ahead
        plan = server.plan_y[0, :top_k].tolist()
        assert plan == [0, 1, 2]
        assert torch.equal(slots[0], buffers[0][3]) and torch.equal(slots[1], buffers[1][2])
        y = server.plan_y[0, top_k:].view(torch.float32).view(2, d)
        want = cpu.experts_2bit_g16([mats[0][e][0] for e in (1, 2)], [mats[0][e][1] for e in (1, 2)],
                                    [mats[0][e][2] for e in (1, 2)], x, threads=2)
        assert torch.equal(y, want)
        assert server.stats()["copies"] == 2 and server.stats()["guesses"] == 1
        _serve(server, 1, x, [0, 3, 2])  # the guess (rank 2 here) goes to the GPU, no copy: the CPU takes ranks 0, 1
        assert server.plan_y[1, :top_k].tolist() == [2, 0, 1]
        stats = server.stats()
        assert stats["copies"] == 2 and stats["guess_hits"] == 1 and stats["served"] == [1, 1]
        _serve(server, 1, x, [0, 3, 1])  # nothing staged any more: the heaviest rank is copied
        assert server.plan_y[1, :top_k].tolist() == [0, 1, 2] and torch.equal(slots[1], buffers[1][0])
        assert server.stats()["errors"] == 0
    finally:
        server.stop()
    assert not server.running


@pytest.mark.skipif(not cpu.available(), reason="no C compiler for the CPU kernels")
def test_the_layer_server_reports_its_flags_when_idle_with_debug(monkeypatch, capfd):
    """MOE_OFFLOAD_SERVER_DEBUG=N: every N s of idling the server prints each layer's go/copied/done flags (where a
    stalled decode step waits). A copies-only server (cpu_k 0), served one layer, then left idle."""
    import time

    monkeypatch.setenv("MOE_OFFLOAD_SERVER_DEBUG", "1")
    buffers = [[torch.full((64,), 16 * layer + e, dtype=torch.uint8) for e in range(3)] for layer in range(2)]
    slots = [torch.zeros(64, dtype=torch.uint8) for _ in range(2)]
    server = cpu.LayerServer(None, [[b.data_ptr() for b in layer] for layer in buffers], 64,
                             [s.data_ptr() for s in slots], top_k=2, cpu_k=0, parity=[0, 0], next_layer=[1, -1],
                             threads=1, guess=False, hidden=32)
    server.start()
    try:
        _serve(server, 1, torch.zeros(32), [2, 0])
        assert torch.equal(slots[0], buffers[1][2]) and torch.equal(slots[1], buffers[1][0])
        time.sleep(1.6)
    finally:
        server.stop()
    err = capfd.readouterr().err
    assert "moe-offload layer server: idle 1 s; go 00 copied 01 done 01; served[0] 0 copies 2 errors 0" in err, err
