"""A CUDA stream that waits for the host CPU without the host thread waiting: ``cuStreamWaitValue32`` on a flag in
pinned memory, which the C expert kernel's worker thread sets once its outputs are written (kernels/cpu.py).

The Python thread that launches GPU work can then enqueue a layer's remaining work (the copy of the CPU's outputs,
the sum, the next layer) while the CPU computes, instead of blocking until it is done. Measured on the H100: a flag
set by the host releases the stream in about 8 microseconds.

* ``available()`` -> bool: the driver has stream memory operations and they work on pinned host memory here
* ``wait_geq(flag, value)``: the current stream waits until ``flag[0] >= value`` (flag: pinned int32 [1])
* ``write_value(flag, value)``: the current stream sets ``flag[0] = value`` once the work before it is done
* ``copy_async(dst, src)``: a copy of ``src``'s bytes into ``dst`` on the current stream (device or pinned memory,
  either way), by the driver: unlike ``Tensor.copy_`` it involves no host allocator bookkeeping, so it is safe to
  capture in a CUDA graph with pinned buffers
* ``driver_for(stream)``: (context, stream, cuCtxSetCurrent, cuMemcpyHtoDAsync_v2, cuStreamWriteValue32_v2) as
  addresses, for C code of this package that issues copies and flag writes from a thread of its own (cpu.LayerServer)
* ``own_stream(device)``: a stream that no other code gets, for work that a waiting stream depends on

A stream that waits on a flag holds everything queued behind it, and the driver does not know what the wait depends
on (the CUDA driver API documentation warns that such waits can deadlock). So the work that sets a flag must never sit
on the waiting stream or share its hardware queue: it goes on ``own_stream``'s stream, not one of PyTorch's pool (the
pool hands out its 32 streams in turn, so a later ``torch.cuda.Stream()`` can be the very same stream), and
``CUDA_DEVICE_MAX_CONNECTIONS`` is raised to 32 queues (moe_offload/__init__.py) from the default 8 that streams share.

All of these are enqueued on the stream and are captured by CUDA graphs like kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

import torch

from ..errors import MoeOffloadError

_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ


@functools.lru_cache(maxsize=None)
def _value_fn(name: str):
    """cuStreamWaitValue32 or cuStreamWriteValue32 (their _v2 where the driver has it): (stream, address, value,
    flags) -> CUresult."""
    lib = _driver()
    fn = getattr(lib, f"{name}_v2", None) or getattr(lib, name)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _stream_value(name: str, flag: torch.Tensor, value: int, flags: int, fallback: str) -> None:
    stream = torch.cuda.current_stream()
    rc = _value_fn(name)(ctypes.c_void_p(stream.cuda_stream), flag.data_ptr(), value & 0xFFFFFFFF, flags)
    if rc != 0:
        raise MoeOffloadError(f"{name} failed (CUDA driver error {rc}); use {fallback}")


def wait_geq(flag: torch.Tensor, value: int) -> None:
    _stream_value("cuStreamWaitValue32", flag, value, _GEQ, "--hybrid off")


@functools.lru_cache(maxsize=None)
def _driver() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuMemcpyAsync.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
    lib.cuMemcpyAsync.restype = ctypes.c_int
    lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    lib.cuCtxGetCurrent.restype = ctypes.c_int
    lib.cuStreamCreateWithPriority.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint, ctypes.c_int]
    lib.cuStreamCreateWithPriority.restype = ctypes.c_int
    lib.cuCtxGetStreamPriorityRange.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
    lib.cuCtxGetStreamPriorityRange.restype = ctypes.c_int
    lib.cuStreamDestroy_v2.argtypes = [ctypes.c_void_p]
    lib.cuStreamDestroy_v2.restype = ctypes.c_int
    return lib


def write_value(flag: torch.Tensor, value: int) -> None:
    _stream_value("cuStreamWriteValue32", flag, value, 0, "--serve-cpu-layers off")


def copy_async(dst: torch.Tensor, src: torch.Tensor) -> None:
    nbytes = src.numel() * src.element_size()
    assert dst.numel() * dst.element_size() == nbytes and dst.is_contiguous() and src.is_contiguous()
    stream = torch.cuda.current_stream()
    rc = _driver().cuMemcpyAsync(dst.data_ptr(), src.data_ptr(), nbytes, ctypes.c_void_p(stream.cuda_stream))
    if rc != 0:
        raise MoeOffloadError(f"cuMemcpyAsync failed (CUDA driver error {rc}); use --serve-cpu-layers off")


@contextlib.contextmanager
def _primary_context(device: torch.device):
    """The device's primary context current on this thread, for driver calls."""
    torch.cuda.init()
    with torch.cuda.device(device):
        torch.cuda.current_stream().synchronize()  # any runtime call on the device makes it current
        yield


def driver_for(stream: torch.cuda.Stream) -> tuple[int, int, int, int, int]:
    """Addresses for C code that issues copies and flag writes on ``stream`` from a thread of its own."""
    lib = _driver()
    with _primary_context(stream.device):
        ctx = ctypes.c_void_p()
        if lib.cuCtxGetCurrent(ctypes.byref(ctx)) != 0 or not ctx.value:
            raise MoeOffloadError("no current CUDA context for the CPU layer server")
    address = lambda fn: ctypes.cast(fn, ctypes.c_void_p).value  # noqa: E731
    return (ctx.value, stream.cuda_stream, address(lib.cuCtxSetCurrent), address(lib.cuMemcpyHtoDAsync_v2),
            address(_value_fn("cuStreamWriteValue32")))


_NON_BLOCKING = 0x1  # CU_STREAM_NON_BLOCKING: no implicit order with the legacy default stream


def own_stream(device: torch.device) -> torch.cuda.ExternalStream:
    """A new non-blocking CUDA stream on ``device`` at the highest priority (cuStreamCreateWithPriority), outside
    PyTorch's stream pool (whose streams are all of the default priority); released with ``release_stream``. The work
    on it is what a waiting stream waits for: it should run first, and a priority of its own keeps it off the queues
    of PyTorch's streams where the driver gives each priority queues of their own."""
    lib = _driver()
    with _primary_context(device):
        least, greatest = ctypes.c_int(), ctypes.c_int()
        if lib.cuCtxGetStreamPriorityRange(ctypes.byref(least), ctypes.byref(greatest)) != 0:
            greatest = ctypes.c_int(0)
        handle = ctypes.c_void_p()
        rc = lib.cuStreamCreateWithPriority(ctypes.byref(handle), _NON_BLOCKING, greatest.value)
    if rc != 0 or not handle.value:
        raise MoeOffloadError(f"cuStreamCreateWithPriority failed (CUDA driver error {rc}); use --serve-cpu-layers off")
    return torch.cuda.ExternalStream(handle.value, device=device)


def release_stream(stream: torch.cuda.ExternalStream) -> None:
    """Wait for ``stream``'s work, then destroy it (``own_stream``'s)."""
    stream.synchronize()
    _driver().cuStreamDestroy_v2(ctypes.c_void_p(stream.cuda_stream))


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Probe once: a wait on an already-set pinned flag must enqueue and complete."""
    if not torch.cuda.is_available():
        return False
    try:
        flag = torch.ones(1, dtype=torch.int32, pin_memory=True)
        wait_geq(flag, 1)
        torch.cuda.current_stream().synchronize()
        return True
    except (OSError, AttributeError, MoeOffloadError, RuntimeError):
        return False
