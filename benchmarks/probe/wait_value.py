"""Probe: a CUDA stream waits (cuStreamWaitValue32) on a flag in torch's pinned memory set by another host thread;
the copy after the wait sees the data written before the flag, and the latency from flag to stream release."""
import ctypes, time, threading, torch
cuda = ctypes.CDLL("libcuda.so.1")
fn = getattr(cuda, "cuStreamWaitValue32_v2", None) or cuda.cuStreamWaitValue32
fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
fn.restype = ctypes.c_int
torch.zeros(1, device="cuda")
flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
src = torch.full((4096,), 7.0, pin_memory=True)
dst = torch.zeros(4096, device="cuda")
s = torch.cuda.current_stream()
t0 = time.perf_counter()
r = fn(ctypes.c_void_p(s.cuda_stream), flag.data_ptr(), 1, 0)  # GEQ
print("wait enqueue rc", r, (time.perf_counter() - t0) * 1e6, "us")
dst.copy_(src, non_blocking=True)
e = torch.cuda.Event(); e.record()
time.sleep(0.05)
print("done before flag?", e.query())
def setter():
    src.fill_(3.0)
    flag[0] = 1
threading.Thread(target=setter).start()
e.synchronize()
print("after flag:", dst[0].item(), "(3.0 expected)")
# latency: round trips
import statistics
lat = []
for i in range(2, 50):
    fn(ctypes.c_void_p(s.cuda_stream), flag.data_ptr(), i, 0)
    ev = torch.cuda.Event(); ev.record()
    t = time.perf_counter(); flag[0] = i; ev.synchronize(); lat.append((time.perf_counter() - t) * 1e6)
print("signal-to-GPU-done latency us: median", statistics.median(lat))
