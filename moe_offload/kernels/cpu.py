"""CPU kernel for batch-1 products over HQQ-packed weights, read in place from host memory.

The C source (``cpu_hqq.c``) is compiled on first use with the machine's C compiler (``$CC``, else gcc
or cc) at ``-O3 -march=native`` with OpenMP, cached under ``$MOE_OFFLOAD_CACHE`` (default
``~/.cache/moe_offload``), and called through ctypes, which releases the GIL: a Python thread can run
experts on the CPU while the main thread keeps the GPU busy.

* ``available()`` -> bool, ``unavailable_reason()`` -> str
* ``CpuMatrix(qt)``: binds one ``QuantizedTensor`` on the CPU (N and group size multiples of 16);
  ``.matvec(x, threads)`` with x float32 [K] -> float32 [N]. 2-bit group-16 matrices (the 4/2 preset's
  experts) take an integer fast path (x rounded to int8 per group of 16; AVX-512 VNNI, AVX-VNNI or AVX2 dot
  products): ``int8_path(qt)``, ``QuantizedVector(x, chunk)`` to round x once for several matrices.
* ``experts_2bit_g16(gates, ups, downs, x, threads)``: a layer's CPU experts in one parallel call;
  ``gate_up_2bit_g16`` the same for the first rows of gate and up only (split experts); ``start(...)`` runs either
  on the library's own worker thread and returns at once (``Started.wait()``), optionally setting a pinned flag for a
  CUDA stream to wait on (``kernels/host_signal.py``).
* ``LayerServer(...)``: a thread of the library that serves CPU layers signalled through flags in pinned memory, a
  GPU stream writing and waiting on them, with no Python per layer (``offload/served.py``; cpu_hqq.c says how).
* ``Int4Matrix(qt)``: the same product through torch's int4 CPU kernel (``_weight_int4pack_mm_for_cpu``),
  from an exact conversion of the HQQ codes (group sizes 32/64/128/256 only; costs its own host copy,
  about 4.5 bits per weight): (q - z) * s = (q - 8) * s + (8 - z) * s, the kernel's form.
* ``hqq_matvec_reference(x, qt)``: the PyTorch reference (dequantize, then multiply)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable

import torch

from ..errors import MoeOffloadError
from ..quant.hqq import QuantizedMeta, QuantizedTensor, dequantize, dequantize_meta
from ..quant.pack import unpack

SOURCE = Path(__file__).with_name("cpu_hqq.c")
ROWS_PER_BLOCK = 16


class _Matrix(ctypes.Structure):  # mirrors hqq_matrix in cpu_hqq.c
    _fields_ = [("n", ctypes.c_int), ("k", ctypes.c_int), ("bits", ctypes.c_int), ("group", ctypes.c_int),
                ("qweight", ctypes.c_void_p), ("meta_bits", ctypes.c_int),
                ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
                ("scale_q", ctypes.c_void_p), ("zero_q", ctypes.c_void_p),
                ("scale_step", ctypes.c_void_p), ("scale_offset", ctypes.c_void_p),
                ("zero_step", ctypes.c_void_p), ("zero_offset", ctypes.c_void_p),
                ("meta_block", ctypes.c_int)]


def _debug_seconds() -> int:
    """MOE_OFFLOAD_SERVER_DEBUG=N: the layer server reports its flags on stderr every N s that it idles (0: never)."""
    value = os.environ.get("MOE_OFFLOAD_SERVER_DEBUG", "0")
    return int(value) if value.isdigit() else 0


class _Server(ctypes.Structure):  # mirrors layer_server in cpu_hqq.c
    _fields_ = ([(name, ctypes.c_int) for name in ("layers", "experts", "top_k", "cpu_k", "threads", "chunk", "prefetch",
                                                   "guess", "hidden")]
                + [(name, ctypes.POINTER(_Matrix)) for name in ("gate", "up", "down")]
                + [("src", ctypes.c_void_p), ("slot", ctypes.c_void_p), ("bytes", ctypes.c_uint64)]
                + [(name, ctypes.c_void_p) for name in ("parity", "next", "go", "copied", "done", "mail", "plan_y",
                                                        "staged", "xq", "xd", "xsum", "g", "u", "hq", "hd", "hsum",
                                                        "ctx", "stream", "ctx_set", "copy", "write", "served", "ms",
                                                        "counters")]
                + [("stop", ctypes.c_int32), ("debug", ctypes.c_int32), ("thread", ctypes.c_uint64)])


def _cache_dir() -> Path:
    return Path(os.environ.get("MOE_OFFLOAD_CACHE", Path.home() / ".cache" / "moe_offload")) / "kernels"


def _cpu_signature() -> str:
    """-march=native code is only valid on the CPU it was built for: key the cache by its flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(compiler: str, out: Path) -> None:
    base = [compiler, "-O3", "-march=native", "-shared", "-fPIC", "-pthread", str(SOURCE), "-o", str(out)]
    errors = []
    for extra in (["-fopenmp"], []):  # without OpenMP the kernel runs on one thread, still correct
        result = subprocess.run(base[:1] + extra + base[1:], capture_output=True, text=True)
        if result.returncode == 0:
            return
        errors.append(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}")
    raise MoeOffloadError(f"could not compile {SOURCE.name} with {compiler}: {errors[-1]}")


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        raise MoeOffloadError("no C compiler found (set CC, or install gcc) to build the CPU expert kernel")
    key = hashlib.sha256(SOURCE.read_bytes() + compiler.encode() + _cpu_signature().encode()).hexdigest()[:16]
    path = _cache_dir() / f"cpu_hqq-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            partial = Path(tmp) / path.name
            _compile(compiler, partial)
            os.replace(partial, path)  # atomic: a concurrent loader sees the old state or a whole library
    # Idle OpenMP workers must sleep, not spin: spinning threads on every core starve the thread that
    # launches GPU work (measured: decode and prefill both slowed). Read when the runtime starts, i.e. now
    # for the C library's own OpenMP runtime (torch's is already running and keeps its settings).
    # (A short spin instead, GOMP_SPINCOUNT=10000, measured slower: Mixtral 4/2, 12 GiB, 12 CPU layers, 17.5 against
    # 19.8 tok/s.)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    lib = ctypes.CDLL(str(path))
    lib.hqq_matvec.argtypes = [ctypes.POINTER(_Matrix), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.hqq_matvec.restype = None
    lib.hqq_has_int8.restype = ctypes.c_int
    lib.hqq_has_avx512.restype = ctypes.c_int
    lib.hqq_quantize_x16.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 3
    lib.hqq_quantize_x16.restype = None
    lib.hqq_matvec_2bit_g16.argtypes = [ctypes.POINTER(_Matrix)] + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
    lib.hqq_matvec_2bit_g16.restype = None
    lib.hqq_experts_2bit_g16.argtypes = ([ctypes.POINTER(_Matrix)] * 3 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                         ctypes.c_int] + [ctypes.c_void_p] * 9 + [ctypes.c_int])
    lib.hqq_experts_2bit_g16.restype = None
    lib.hqq_experts_submit.argtypes = lib.hqq_experts_2bit_g16.argtypes + [ctypes.c_void_p, ctypes.c_int32]
    lib.hqq_experts_submit.restype = ctypes.c_int
    lib.hqq_experts_wait.argtypes = []
    lib.hqq_experts_wait.restype = ctypes.c_double
    lib.hqq_server_start.argtypes = [ctypes.POINTER(_Server)]
    lib.hqq_server_start.restype = ctypes.c_int
    lib.hqq_server_stop.argtypes = [ctypes.POINTER(_Server)]
    lib.hqq_server_stop.restype = None
    return lib


def unavailable_reason() -> str | None:
    try:
        _library()
    except (MoeOffloadError, OSError) as e:
        return str(e)
    return None


def available() -> bool:
    return unavailable_reason() is None


def supports(qt: QuantizedTensor) -> bool:
    n, _ = qt.shape
    return n % ROWS_PER_BLOCK == 0 and qt.spec.group_size % 16 == 0 and qt.spec.bits in (2, 3, 4, 8)


def int8_available() -> bool:
    """Whether this build has the integer fast path (an AVX2, AVX-VNNI or AVX-512 VNNI CPU)."""
    return bool(_library().hqq_has_int8())


def int8_path(qt: QuantizedTensor) -> bool:
    """Whether the integer fast path computes this matrix here: 2-bit codes in groups of 16 (the 4/2 preset's
    experts), K % 128 == 0, 8-bit metadata in blocks of a multiple of 8 groups, and an AVX2 (or VNNI) build."""
    n, k = qt.shape
    if qt.spec.bits != 2 or qt.spec.group_size != 16 or k % 128:
        return False
    if isinstance(qt.scale, QuantizedMeta) and (k // 16 // qt.scale.step.shape[1]) % 8:
        return False
    return int8_available()


# Bytes ahead in each row's codes that the 512-bit path prefetches into L1 (0: hardware prefetchers only).
# Measured on the H100 host (16-core Xeon, 15 threads, a 4/2 Mixtral expert): 1.17 ms without, 0.98 ms at 1024.
PREFETCH_BYTES = 1024


def chunk_width(qt: QuantizedTensor, simd: str = "auto") -> int:
    """Codes per vector load of the integer path: 256 (512-bit AVX-512 VNNI) where the build and the matrix
    allow it (K % 256, 8-bit metadata in blocks of a multiple of 16 groups), else 128 (256-bit).
    ``simd="avx2"`` forces the 256-bit path (benchmarks compare the two)."""
    _, k = qt.shape
    if simd == "avx2" or k % 256 or not _library().hqq_has_avx512():
        return 128
    if isinstance(qt.scale, QuantizedMeta) and (k // 16 // qt.scale.step.shape[1]) % 16:
        return 128
    return 256


class QuantizedVector:
    """x rounded to int8 per group of 16 for the integer fast path (computed once, used by every matrix
    that multiplies the same x: an expert's gate and up projections), stored permuted for loads of
    ``chunk`` codes (``chunk_width``)."""

    def __init__(self, x: torch.Tensor, chunk: int = 128):
        k = x.shape[0]
        self.x, self.chunk = x, chunk
        self.xp = torch.empty(k, dtype=torch.int8)
        self.dx = torch.empty(k // 16, dtype=torch.float32)
        self.xs = torch.empty(k // 16, dtype=torch.float32)
        _library().hqq_quantize_x16(x.data_ptr(), k, chunk, self.xp.data_ptr(), self.dx.data_ptr(), self.xs.data_ptr())

    def dequantized(self) -> torch.Tensor:
        """x as the fast path sees it (float32 [K]): for tests and error bounds."""
        k, ch = self.x.shape[0], self.chunk
        e = torch.arange(k)
        c, r = e // ch, e % ch
        x8 = self.xp[ch * c + (ch // 4) * (r % 4) + r // 4].float()
        return x8 * self.dx.repeat_interleave(16)


class CpuMatrix:
    """One quantized matrix bound for repeated CPU products (the struct is built once, not per call).

    ``int8_activations`` (default: wherever the fast path applies, see ``int8_path``) rounds x to int8 per
    group of 16 and multiplies in integers: several times faster, at 8-bit activation precision."""

    def __init__(self, qt: QuantizedTensor, int8_activations: bool | None = None, simd: str = "auto"):
        if qt.device.type != "cpu":
            raise MoeOffloadError(f"CpuMatrix needs host tensors, got {qt.device}")
        if not supports(qt):
            raise MoeOffloadError(f"the CPU kernel needs N % {ROWS_PER_BLOCK} == 0 and a group size that is a "
                                  f"multiple of 16; got shape {qt.shape}, group {qt.spec.group_size}")
        self.qt = qt  # keeps the (store) memory the struct points into alive
        n, k = qt.shape
        self.n, self.k, self.groups = n, k, k // qt.spec.group_size
        tensors = qt.tensors()
        for t in tensors.values():
            if not t.is_contiguous():
                raise MoeOffloadError("CpuMatrix needs contiguous tensors")
        ptr = {name: t.data_ptr() for name, t in tensors.items()}
        m = _Matrix(n=n, k=k, bits=qt.spec.bits, group=qt.spec.group_size, qweight=ptr["qweight"])
        if isinstance(qt.scale, QuantizedMeta):
            assert isinstance(qt.zero, QuantizedMeta)
            # 4-bit codes: both pointers on the shared byte, the kernel takes the scale's low nibble, the zero's high
            m.meta_bits = qt.scale.bits
            m.scale_q, m.scale_step, m.scale_offset = qt.scale.q.data_ptr(), ptr["scale_step"], ptr["scale_offset"]
            m.zero_q, m.zero_step, m.zero_offset = qt.zero.q.data_ptr(), ptr["zero_step"], ptr["zero_offset"]
            m.meta_block = self.groups // qt.scale.step.shape[1]
        else:
            m.meta_bits, m.scale, m.zero, m.meta_block = 0, ptr["scale"], ptr["zero"], 1
        self._struct = m
        self._lib = _library()
        fast = int8_path(qt)
        if int8_activations and not fast:
            raise MoeOffloadError(f"int8 activations need 2-bit group-16 weights and an AVX2 CPU; got {qt.spec}")
        self.int8 = fast if int8_activations is None else bool(int8_activations)
        self.chunk = chunk_width(qt, simd) if self.int8 else 128

    def matvec(self, x: torch.Tensor | QuantizedVector, threads: int) -> torch.Tensor:
        """x: float32 [K] contiguous on the CPU (or a QuantizedVector of one) -> float32 [N]."""
        vec = x.x if isinstance(x, QuantizedVector) else x
        if vec.dtype != torch.float32 or vec.shape != (self.k,) or not vec.is_contiguous() or vec.device.type != "cpu":
            raise MoeOffloadError(f"matvec expects a contiguous float32 CPU vector of {self.k}, got {vec.dtype} {tuple(vec.shape)}")
        y = torch.empty(self.n, dtype=torch.float32)
        if self.int8:
            q = x if isinstance(x, QuantizedVector) and x.chunk == self.chunk else QuantizedVector(vec, self.chunk)
            self._lib.hqq_matvec_2bit_g16(ctypes.byref(self._struct), q.xp.data_ptr(), q.dx.data_ptr(),
                                          q.xs.data_ptr(), y.data_ptr(), self.chunk, PREFETCH_BYTES, int(threads))
            return y
        xsum = vec.view(self.groups, -1).sum(dim=1)
        self._lib.hqq_matvec(ctypes.byref(self._struct), vec.data_ptr(), xsum.data_ptr(), y.data_ptr(), int(threads))
        return y


def _experts_args(gates: list[CpuMatrix], ups: list[CpuMatrix], downs: list[CpuMatrix] | None, x: torch.Tensor,
                  work: tuple[torch.Tensor, ...] | None, pinned: bool = False) -> tuple[tuple, torch.Tensor]:
    """The C arguments of hqq_experts_2bit_g16 (after ``threads``) and the output tensor; ``downs`` None: gate and up
    only. ``work``: scratch to use (default: this thread's)."""
    name = "experts_2bit_g16" if downs is not None else "gate_up_2bit_g16"
    n = len(gates)
    if not fusable(gates, ups, downs):
        raise MoeOffloadError(f"{name} needs 2-bit group-16 matrices on the integer path, one shape and chunk")
    d, i = gates[0].k, gates[0].n
    if x.dtype != torch.float32 or x.shape != (d,) or not x.is_contiguous():
        raise MoeOffloadError(f"{name} expects a contiguous float32 vector of {d}, got {x.dtype} {tuple(x.shape)}")
    structs = [(_Matrix * n)(*[m._struct for m in ms]) for ms in (gates, ups, downs or [])]
    width = d if downs is not None else i
    out = _pinned_output(n, width) if pinned else torch.empty(n, width)
    work = work if work is not None else _experts_work(n, d, i)
    args = (*structs[:2], structs[2] if downs is not None else None, n, x.data_ptr(), gates[0].chunk, PREFETCH_BYTES,
            *(t.data_ptr() for t in (*work, out)))
    return args, out


def experts_2bit_g16(gates: list[CpuMatrix], ups: list[CpuMatrix], downs: list[CpuMatrix], x: torch.Tensor,
                     threads: int) -> torch.Tensor:
    """down_e(silu(gate_e x) * up_e x) for several SwiGLU experts at once, one parallel region in all (one layer's
    CPU experts): x float32 [D] -> float32 [n, D]. Every matrix must be on the integer path with one chunk width
    and expert 0's shapes (``fusable``)."""
    args, y = _experts_args(gates, ups, downs, x, None)
    _library().hqq_experts_2bit_g16(*args, int(threads))
    return y


def gate_up_2bit_g16(gates: list[CpuMatrix], ups: list[CpuMatrix], x: torch.Tensor, threads: int) -> torch.Tensor:
    """silu(gate_e x) * up_e x for several experts at once, one parallel region: x float32 [D] -> float32 [n, I], where
    I is the matrices' row count (the first I hidden units of split experts: row-prefix matrices). Same conditions as
    ``experts_2bit_g16`` for gate and up."""
    args, h = _experts_args(gates, ups, None, x, None)
    _library().hqq_experts_2bit_g16(*args, int(threads))
    return h


class Started:
    """``experts_2bit_g16`` or ``gate_up_2bit_g16`` running on the C library's own worker thread (``start``).

    ``wait()`` -> (output, milliseconds the C call took); it releases the interpreter lock while it waits, and calls
    ``on_done(ms)`` once. ``signal`` (flag, seq): the worker sets the pinned int32 ``flag`` to ``seq`` once the output
    (then in pinned memory) is written, so a CUDA stream can wait for it instead of the host (kernels/host_signal.py).
    """

    def __init__(self, out: torch.Tensor, keep: tuple, signal: tuple[torch.Tensor, int] | None = None,
                 on_done: Callable[[float], None] | None = None):
        self.out, self._keep, self.signal, self.on_done, self.ms = out, keep, signal, on_done, None

    def wait(self) -> tuple[torch.Tensor, float]:
        global _running
        if self.ms is None:  # the C side's one job is this one
            self.ms = _library().hqq_experts_wait()
            self._keep = None  # the C side is done with the structs, x and the scratch
            _running = None
            if self.on_done is not None:
                self.on_done(self.ms)
        return self.out, self.ms


def start(gates: list[CpuMatrix], ups: list[CpuMatrix], downs: list[CpuMatrix] | None, x: torch.Tensor,
          threads: int, signal: bool = False, on_done: Callable[[float], None] | None = None) -> Started:
    """Start ``experts_2bit_g16`` (or, ``downs`` None, ``gate_up_2bit_g16``) on the library's worker thread and return
    at once: the caller's thread launches GPU work meanwhile, and no Python thread has to be scheduled for the CPU
    work to start or finish. One job at a time (a previous one is waited for first). ``signal``: write the output
    into pinned memory and set a pinned flag after it (``Started.signal``)."""
    global _running, _seq
    if _running is not None:  # one job at a time: the previous one finishes first (its scratch is reused)
        _running.wait()
    n, d, i = len(gates), gates[0].k, gates[0].n
    work = _async_work.get((n, d, i))
    if work is None:
        work = _async_work[(n, d, i)] = _new_work(n, d, i)
    args, out = _experts_args(gates, ups, downs, x, work, pinned=signal)
    flag = None
    if signal:
        flag, _seq = _signal_flag(), _seq + 1
    if _library().hqq_experts_submit(*args, int(threads), None if flag is None else flag.data_ptr(), _seq) != 0:
        raise MoeOffloadError("could not start the CPU expert worker thread")
    _running = Started(out, (args, x, work), None if flag is None else (flag, _seq), on_done)
    return _running


def wait_running() -> None:
    """Wait for the job on the C worker, if any (e.g. before its buffers are dropped)."""
    if _running is not None:
        _running.wait()


_running: Started | None = None  # the job the C worker holds, until waited for
_seq = 0  # the last job's signal value


@functools.lru_cache(maxsize=None)
def _signal_flag() -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, pin_memory=True)


_PINNED_RING = 4  # outputs in flight: the host runs at most a layer or two ahead of the GPU that copies them
_pinned: dict[tuple[int, int], tuple[list[torch.Tensor], list[int]]] = {}


def _pinned_output(rows: int, cols: int) -> torch.Tensor:
    """The next pinned buffer of a small ring per shape (pinning per call would cost more than the copy)."""
    ring, at = _pinned.setdefault((rows, cols), ([torch.empty(rows, cols, pin_memory=True)
                                                  for _ in range(_PINNED_RING)], [0]))
    at[0] = (at[0] + 1) % _PINNED_RING
    return ring[at[0]]


_work = threading.local()  # per thread: the hybrid executor's worker and the decode thread may both call
_async_work: dict[tuple[int, int, int], tuple[torch.Tensor, ...]] = {}  # the C worker's (one job at a time)


def _new_work(n: int, d: int, i: int) -> tuple[torch.Tensor, ...]:
    return (torch.empty(d, dtype=torch.int8), torch.empty(d // 16), torch.empty(d // 16), torch.empty(n * i),
            torch.empty(n * i), torch.empty(n * i, dtype=torch.int8), torch.empty(n * i // 16), torch.empty(n * i // 16))


def _experts_work(n: int, d: int, i: int) -> tuple[torch.Tensor, ...]:
    """Scratch of ``experts_2bit_g16`` (int8 x and its block scales and sums, g, u, int8 h and its scales and sums),
    kept per thread and shape: a layer's call would otherwise allocate nine small tensors each time."""
    cache = _work.__dict__.setdefault("buffers", {})
    if (n, d, i) not in cache:
        cache[(n, d, i)] = _new_work(n, d, i)
    return cache[(n, d, i)]


def fusable(gates: list[CpuMatrix], ups: list[CpuMatrix], downs: list[CpuMatrix] | None) -> bool:
    """Whether ``experts_2bit_g16`` can compute these experts: all on the integer path, one chunk width, SwiGLU
    shapes (gate/up [I, D], down [D, I]) equal across experts. ``downs`` None: gate and up only (``gate_up_2bit_g16``)."""
    ms = [*gates, *ups, *(downs or [])]
    if not gates or not all(isinstance(m, CpuMatrix) and m.int8 and m.chunk == gates[0].chunk for m in ms):
        return False
    d, i = gates[0].k, gates[0].n
    return (all((m.n, m.k) == (i, d) for m in (*gates, *ups)) and len(gates) == len(ups)
            and (downs is None or (all((m.n, m.k) == (d, i) for m in downs) and len(downs) == len(gates))))


INT4_GROUPS = (32, 64, 128, 256)


def int4_supported(qt: QuantizedTensor) -> bool:
    return qt.spec.bits <= 4 and qt.spec.group_size in INT4_GROUPS and qt.shape[0] % 16 == 0


class Int4Matrix:
    """An HQQ matrix converted exactly into torch's int4 CPU layout (a separate host copy)."""

    def __init__(self, qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16):
        # bfloat16 is the kernel's fast path (activations and scales); float32 makes the product exact
        if not int4_supported(qt):
            raise MoeOffloadError(f"torch's int4 kernel takes 2-4 bit codes in groups of {INT4_GROUPS}; got "
                                  f"{qt.spec.bits}-bit group {qt.spec.group_size}")
        n, k = qt.shape
        self.n, self.k, self.group = n, k, qt.spec.group_size
        codes = unpack(qt.qweight, qt.spec.bits, k).to(torch.int32)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scale, zero = dequantize_meta(qt.scale), dequantize_meta(qt.zero)  # float32 [N, M]
        self.scales_and_zeros = torch.stack([scale, (8 - zero) * scale], dim=-1).transpose(0, 1).contiguous().to(dtype)
        self.dtype = dtype

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_and_zeros.numel() * self.dtype.itemsize

    def matvec(self, x: torch.Tensor, threads: int) -> torch.Tensor:
        # runs on torch's own thread pool, sized by the caller (the hybrid worker sets torch.set_num_threads)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.view(1, -1).to(self.dtype), self.packed, self.group,
                                                       self.scales_and_zeros)
        return y.view(-1).float()


def hqq_matvec_reference(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """float32 reference: x [K] @ dequantize(W).T -> [N], in float64 for an unambiguous yardstick."""
    return (dequantize(qt, torch.float64) @ x.double()).float()


SERVER_COUNTERS = ("copies", "guesses", "guess_hits", "errors")  # the order of cpu_hqq.c's enum


class LayerServer:
    """A thread of the C library serving CPU layers at decode (cpu_hqq.c, ``layer_server``), fed through pinned memory:

    * ``mail`` float32 [L, D + K + 1]: the caller writes x, then the K routed experts and a guess of the next CPU
      layer's first expert (-1: none) as int32, then sets ``go[l] = 1``;
    * the thread picks the GPU's share (``top_k - cpu_k`` experts, one copied ahead on a guess first), copies those
      experts' buffers to ``slots[parity[l] * gpu_k + j]`` and sets ``copied[l] = 1`` behind them, copies its guess for
      layer ``next[l]`` ahead, computes the CPU's share and sets ``done[l] = 1``;
    * ``plan_y`` int32 [L, K + cpu_k * D]: the ranks of the GPU's share (slot order), then the CPU's, then the CPU's
      outputs (float32 [cpu_k, D], in plan order).

    ``experts[l][e]``: (gate, up, down) CpuMatrix of every expert of the served layers (``fusable``), or None with
    ``cpu_k`` 0 (the thread only copies: experts of any format; ``hidden`` then gives D); ``sources[l][e]``: the address
    of each expert's host buffer (``nbytes``); ``slots``: gpu_k destination addresses per parity, for the parities in
    ``parity`` (two sets, or one where every parity is 0; guesses need two). ``driver``:
    (context, stream, cuCtxSetCurrent, cuMemcpyHtoDAsync_v2, cuStreamWriteValue32_v2) addresses for copies on a CUDA
    stream (host_signal.driver_for); None: memcpy on the thread (a CPU device). Flags and buffers are pinned when
    ``pinned``. ``start()`` before the first go, ``stop()`` when done."""

    def __init__(self, experts: list[list[tuple[CpuMatrix, CpuMatrix, CpuMatrix]]] | None, sources: list[list[int]],
                 nbytes: int, slots: list[int], top_k: int, cpu_k: int, parity: list[int], next_layer: list[int],
                 threads: int, guess: bool = True, pinned: bool = False, driver: tuple[int, ...] | None = None,
                 hidden: int | None = None):
        layers, n_experts = len(sources), len(sources[0])
        flat = [m for layer in experts for expert in layer for m in expert] if experts is not None else []
        if cpu_k and not (flat and fusable(flat[0::3], flat[1::3], flat[2::3])):
            raise MoeOffloadError("the CPU layer server needs 2-bit group-16 experts on the integer path, one shape")
        gpu_k = top_k - cpu_k
        sets = 1 + max(parity, default=0)
        if not 0 <= cpu_k <= top_k or len(slots) != sets * gpu_k or (guess and sets < 2 and gpu_k):
            raise MoeOffloadError(f"cpu_k {cpu_k} of top_k {top_k} needs {sets * (top_k - cpu_k)} slots for {sets} "
                                  f"set(s), got {len(slots)} (guesses need two sets)")
        d, i = (flat[0].k, flat[0].n) if flat else (hidden, 16)
        if d is None:
            raise MoeOffloadError("the CPU layer server needs the hidden size where it computes no expert")
        self.layers, self.top_k, self.cpu_k, self.gpu_k, self.hidden = layers, top_k, cpu_k, gpu_k, d
        self.pinned = pinned

        def buffer(*shape, dtype=torch.int32, fill=0):
            return torch.full(shape, fill, dtype=dtype, pin_memory=pinned)

        self.go, self.copied, self.done = buffer(layers), buffer(layers), buffer(layers)
        self.mail = buffer(layers, d + top_k + 1, dtype=torch.float32)
        self.plan_y = buffer(layers, top_k + cpu_k * d)
        self.staged = buffer(layers, fill=-1)
        self.served = torch.zeros(layers, dtype=torch.int64)
        self.ms = torch.zeros(layers, dtype=torch.float64)
        self.counters = torch.zeros(len(SERVER_COUNTERS), dtype=torch.int64)
        self._parity = torch.tensor(parity, dtype=torch.int32)
        self._next = torch.tensor(next_layer, dtype=torch.int32)
        self._src = torch.tensor([a for layer in sources for a in layer], dtype=torch.int64)
        self._slots = torch.tensor(slots or [0], dtype=torch.int64)
        self._work = _new_work(max(cpu_k, 1), d, i)
        self._structs = [(_Matrix * len(flat[j::3]))(*[m._struct for m in flat[j::3]]) for j in range(3)] if flat else []
        self._keep = flat  # the matrices own the store views the structs point into
        s = _Server(layers=layers, experts=n_experts, top_k=top_k, cpu_k=cpu_k, threads=int(threads),
                    chunk=flat[0].chunk if flat else 0, prefetch=PREFETCH_BYTES, guess=int(guess), hidden=d,
                    src=self._src.data_ptr(), slot=self._slots.data_ptr(), bytes=nbytes,
                    debug=_debug_seconds())
        if flat:
            s.gate, s.up, s.down = self._structs
        for name in ("go", "copied", "done", "mail", "plan_y", "staged", "served", "ms", "counters"):
            setattr(s, name, getattr(self, name).data_ptr())
        s.parity, s.next = self._parity.data_ptr(), self._next.data_ptr()
        for name, t in zip(("xq", "xd", "xsum", "g", "u", "hq", "hd", "hsum"), self._work):
            setattr(s, name, t.data_ptr())
        if driver is not None:
            s.ctx, s.stream, s.ctx_set, s.copy, s.write = driver
        self._struct = s
        self.running = False

    def start(self) -> None:
        if self.running:
            return
        rc = _library().hqq_server_start(ctypes.byref(self._struct))
        if rc != 0:
            raise MoeOffloadError(f"could not start the CPU layer server (code {rc})")
        self.running = True

    def stop(self) -> None:
        if self.running:
            _library().hqq_server_stop(ctypes.byref(self._struct))
            self.running = False

    def stats(self) -> dict[str, object]:
        """Counters so far: ``served`` and ``ms`` per layer, and SERVER_COUNTERS."""
        return {"served": self.served.tolist(), "ms": self.ms.tolist(),
                **dict(zip(SERVER_COUNTERS, self.counters.tolist()))}

    def __del__(self):
        try:
            self.stop()
        except Exception:  # interpreter shutdown: the library may be gone; the process takes the thread with it
            pass
