"""Weights streamed through shared memory with bulk copies (TMA): two experiments of session 10, both slower than the
Triton GEMV chain that lib.musicgen_fast runs, kept here with the benchmark that measured them (bench/gemv_stream.py,
bench/results/gemv-stream-h100.log, bench/README.md "Session 10"). Nothing in lib uses this module.

1. `stream_gemv`, a drop-in for lib.musicgen_fast._gemv on Hopper (layer norm prologue, exact-erf GELU of the rounded
   product, residual added in fp32 and rounded once). The Triton GEMV holds a weight tile in registers; as a
   programmatic dependent it can ask for that tile before it waits for the previous kernel, but registers bound the
   bytes in flight. Here each program (one per SM) asks for its block of W's rows with bulk copies into a ring of
   shared-memory stages, each completed on an mbarrier, before `griddepcontrol.wait`: ~100 KB on the way per program,
   and two GEMVs of a chain resident on an SM at once. After the wait, x (M <= 4 rows, layer-normed where asked) goes
   to shared memory; a stage is one pass of `threads / tpr` rows, `tpr` threads per row reading 16-byte vectors, and
   is refilled with the rows `ring` stages further on once every thread is past it.
2. `stream_chain`, a persistent chain of GEMVs: a producer warp per program streams every phase's weights through the
   ring without stopping at phase boundaries, the consumers wait for the phase before (a grid-wide counter) only to
   read x. The question was whether a decode step whose kernels do not end keeps HBM busier than separate kernels.

CUDA C++ compiled at run time by NVRTC (torch's CUDA wheels ship it), loaded and launched through the driver API with
ctypes; compute capability 9.0+.
"""
from __future__ import annotations

import ctypes
import glob
import os
import threading

import torch

_SOURCE = r"""
#define MAXM 4
#define MAXS 16
#define NVMAX 4
#if ELT == 0
typedef unsigned short T;
__device__ __forceinline__ float to_f(T v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f; }
__device__ __forceinline__ T from_f(float f) { T v; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f)); return v; }
#elif ELT == 1
typedef unsigned short T;
__device__ __forceinline__ float to_f(T v) { return __uint_as_float(((unsigned)v) << 16); }
__device__ __forceinline__ T from_f(float f) { T v; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f)); return v; }
#else
typedef float T;
__device__ __forceinline__ float to_f(T v) { return v; }
__device__ __forceinline__ T from_f(float f) { return f; }
#endif
#define VEC (16 / (int)sizeof(T))
#define F_LN 1
#define F_GELU 2
#define F_RES 4
#define F_PDL 8
#define F_EARLY 16
#define F_STREAM_ONLY 32  // diagnostic (bench/gemv_stream.py): the weights streamed in, no products (wrong output)

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// the 16-byte vector v (VEC values) dotted with the 16-byte vector x, in fp32
__device__ __forceinline__ float dot16(uint4 v, uint4 x) {
#if ELT == 2
    return __uint_as_float(v.x) * __uint_as_float(x.x) + __uint_as_float(v.y) * __uint_as_float(x.y)
         + __uint_as_float(v.z) * __uint_as_float(x.z) + __uint_as_float(v.w) * __uint_as_float(x.w);
#else
    const unsigned a[4] = {v.x, v.y, v.z, v.w}, b[4] = {x.x, x.y, x.z, x.w};
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        s += to_f((T)(a[i] & 0xffff)) * to_f((T)(b[i] & 0xffff));
        s += to_f((T)(a[i] >> 16)) * to_f((T)(b[i] >> 16));
    }
    return s;
#endif
}

__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned phase) {
    asm volatile("{\n .reg .pred p;\n WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
                 " @!p bra WAIT;\n}\n" :: "r"(bar), "r"(phase) : "memory");
}

// the VEC values of a 16-byte vector, as fp32
__device__ __forceinline__ void unpack(uint4 v, float* f) {
#if ELT == 2
    f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y); f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
#else
    const unsigned a[4] = {v.x, v.y, v.z, v.w};
    _Pragma("unroll") for (int i = 0; i < 4; i++) { f[2 * i] = to_f((T)(a[i] & 0xffff)); f[2 * i + 1] = to_f((T)(a[i] >> 16)); }
#endif
}

__device__ __forceinline__ float warp_sum(float v, int width) {
    for (int o = width / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// the sum of each of v[0..M) over the block (red: nwarps * MAXM floats of shared memory)
template <int M>
__device__ __forceinline__ void block_sum(float* v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int m = 0; m < M; m++) {
        float s = warp_sum(v[m], 32);
        if (lane == 0) red[warp * MAXM + m] = s;
    }
    __syncthreads();
    for (int m = 0; m < M; m++) {
        float s = 0.f;
        for (int w = 0; w < nw; w++) s += red[w * MAXM + m];
        v[m] = s;
    }
    __syncthreads();
}

template <int M>
__device__ __forceinline__ void gemv_body(
    const T* __restrict__ X, const T* __restrict__ W, T* Y, const T* R, const T* __restrict__ LW,
    const T* __restrict__ LB, int N, int K, long long sx, long long sy, long long sr, float eps, int flags,
    int tpr, int ring, int xs_bytes, unsigned long long* trace)
{
    unsigned long long t0 = 0, t1 = 0;
    if (trace) asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned long long* bar = (unsigned long long*)smem;              // MAXS mbarriers
    float* red = (float*)(smem + 8 * MAXS);                           // 2 x 8 warps x MAXM partial sums
    const int ln_bytes = (flags & F_LN) ? (2 * K * (int)sizeof(T) + 127) / 128 * 128 : 0;
    T* lnw = (T*)(smem + 512);                                        // with F_LN: the norm's weight, bias
    T* xs = (T*)(smem + 512 + ln_bytes);                              // x, M x K
    unsigned char* stages = smem + 512 + ln_bytes + xs_bytes;

    const int tid = threadIdx.x, nt = blockDim.x;
    const int rpp = nt / tpr;                                          // rows per stage
    const int n0 = (int)((long long)blockIdx.x * N / gridDim.x);
    const int nrows = (int)((long long)(blockIdx.x + 1) * N / gridDim.x) - n0;
    const int nstages = (nrows + rpp - 1) / rpp;
    const unsigned row_bytes = (unsigned)K * sizeof(T);
    const unsigned stage_bytes = rpp * row_bytes;
    const char* wsrc = (const char*)(W + (long long)n0 * K);

    if ((flags & F_PDL) && (flags & F_EARLY)) asm volatile("griddepcontrol.launch_dependents;");
    if (tid == 0) {
        for (int s = 0; s < ring; s++)
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_addr(bar + s)));
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_addr(bar + MAXS - 1)));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    unsigned long long policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    // stage s: rows [s * rpp, min((s + 1) * rpp, nrows)) of this program's block, into buffer s % ring
#define ISSUE(s) do { \
        const unsigned rows_ = min(rpp, nrows - (s) * rpp), bytes_ = rows_ * row_bytes; \
        const unsigned b_ = smem_addr(bar + (s) % ring), d_ = smem_addr(stages + ((s) % ring) * stage_bytes); \
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(b_), "r"(bytes_) : "memory"); \
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" \
                     :: "r"(d_), "l"(wsrc + (long long)(s) * stage_bytes), "r"(bytes_), "r"(b_), "l"(policy) : "memory"); \
    } while (0)
    if (tid == 0) {
        if (flags & F_LN) {  // the norm's weights, which no kernel writes, on the last barrier
            const unsigned b_ = smem_addr(bar + MAXS - 1), n_ = K * sizeof(T);
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(b_), "r"(2 * n_) : "memory");
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                         :: "r"(smem_addr(lnw)), "l"(LW), "r"(n_), "r"(b_) : "memory");
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                         :: "r"(smem_addr(lnw + K)), "l"(LB), "r"(n_), "r"(b_) : "memory");
        }
        for (int s = 0; s < ring && s < nstages; s++) ISSUE(s);
    }
    if (flags & F_PDL) {
        asm volatile("griddepcontrol.wait;" ::: "memory");
        if (!(flags & F_EARLY)) asm volatile("griddepcontrol.launch_dependents;");
    }
    if (trace) asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));

    // x into shared memory; with F_LN its layer norm (statistics in fp32, rounded to T as a layer norm kernel would)
    float v[MAXM];
    _Pragma("unroll") for (int m = 0; m < M; m++) v[m] = 0.f;
    _Pragma("unroll") for (int m = 0; m < M; m++)
        for (int k = tid; k < K; k += nt) {
            const T a = X[m * sx + k];
            xs[m * K + k] = a;
            v[m] += to_f(a);
        }
    if (flags & F_LN) {
        block_sum<M>(v, red);
        float mean[MAXM];
        _Pragma("unroll") for (int m = 0; m < M; m++) { mean[m] = v[m] / K; v[m] = 0.f; }
        _Pragma("unroll") for (int m = 0; m < M; m++)
            for (int k = tid; k < K; k += nt) { const float d = to_f(xs[m * K + k]) - mean[m]; v[m] += d * d; }
        block_sum<M>(v, red);
        mbar_wait(smem_addr(bar + MAXS - 1), 0);
        _Pragma("unroll") for (int m = 0; m < M; m++) {
            const float rstd = rsqrtf(v[m] / K + eps);
            for (int k = tid; k < K; k += nt)
                xs[m * K + k] = from_f((to_f(xs[m * K + k]) - mean[m]) * rstd * to_f(lnw[k]) + to_f(lnw[K + k]));
        }
    }
    __syncthreads();

    const int r = tid / tpr, li = tid % tpr, kv = K / VEC, wpr = tpr / 32;
    const int lane = tid & 31, warp = tid >> 5;
    // a thread reads the same vectors i = li + j * tpr of every row: with at most NVMAX of them, its x values are
    // held in registers as fp32 (converted once, not once per row)
    const bool in_regs = (kv + tpr - 1) / tpr <= NVMAX;
    float xr[M][NVMAX][VEC];
    if (in_regs) {
        _Pragma("unroll") for (int j = 0; j < NVMAX; j++) {
            const int i = li + j * tpr;
            _Pragma("unroll") for (int m = 0; m < M; m++) {
                const uint4 z = {0u, 0u, 0u, 0u};
                unpack(i < kv ? ((const uint4*)xs)[m * kv + i] : z, xr[m][j]);
            }
        }
    }
    for (int s = 0; s < nstages; s++) {
        mbar_wait(smem_addr(bar + s % ring), (s / ring) & 1);
        const int row = s * rpp + r;
        float acc[MAXM];
        _Pragma("unroll") for (int m = 0; m < M; m++) acc[m] = 0.f;
        if (row < nrows && !(flags & F_STREAM_ONLY)) {
            const uint4* wv = (const uint4*)(stages + (s % ring) * stage_bytes + r * row_bytes);
            if (in_regs) {
                _Pragma("unroll") for (int j = 0; j < NVMAX; j++) {
                    const int i = li + j * tpr;
                    if (i < kv) {
                        float f[VEC];
                        unpack(wv[i], f);
                        _Pragma("unroll") for (int m = 0; m < M; m++)
                            _Pragma("unroll") for (int e = 0; e < VEC; e++) acc[m] = fmaf(f[e], xr[m][j][e], acc[m]);
                    }
                }
            } else {
                const uint4* xv = (const uint4*)xs;
                for (int i = li; i < kv; i += tpr) {
                    const uint4 w = wv[i];
                    _Pragma("unroll") for (int m = 0; m < M; m++) acc[m] += dot16(w, xv[m * kv + i]);
                }
            }
        }
        _Pragma("unroll") for (int m = 0; m < M; m++) acc[m] = warp_sum(acc[m], tpr < 32 ? tpr : 32);
        float* part = red + (s & 1) * 8 * MAXM;
        if (wpr > 1 && lane == 0)
            _Pragma("unroll") for (int m = 0; m < M; m++) part[warp * MAXM + m] = acc[m];
        __syncthreads();  // every thread is past this stage: its buffer may be refilled
        if (tid == 0 && s + ring < nstages) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            ISSUE(s + ring);
        }
        int orow = -1;
        if (wpr <= 1) {
            if (li == 0) orow = row;
        } else if (li == 0) {
            orow = row;
            _Pragma("unroll") for (int m = 0; m < M; m++) {
                float t = 0.f;
                for (int w = 0; w < wpr; w++) t += part[(r * wpr + w) * MAXM + m];
                acc[m] = t;
            }
        }
        if (orow >= 0 && orow < nrows) {
            const int n = n0 + orow;
            _Pragma("unroll") for (int m = 0; m < M; m++) {
                float o = acc[m];
                if (flags & F_GELU) { o = to_f(from_f(o)); o = 0.5f * o * (1.f + erff(o * 0.7071067811865476f)); }
                if (flags & F_RES) o += to_f(R[m * sr + n]);
                Y[m * sy + n] = from_f(o);
            }
        }
    }
    if (trace && tid == 0) {  // diagnostic (bench): per program its SM, start, past the wait, end (ns)
        unsigned long long t2, sm;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t2));
        asm volatile("{ .reg .u32 s; mov.u32 s, %%smid; cvt.u64.u32 %0, s; }" : "=l"(sm));
        trace[blockIdx.x * 4] = sm; trace[blockIdx.x * 4 + 1] = t0; trace[blockIdx.x * 4 + 2] = t1;
        trace[blockIdx.x * 4 + 3] = t2;
    }
}
#define KERNEL(MM) extern "C" __global__ void __launch_bounds__(256) stream_gemv_##MM( \
    const T* __restrict__ X, const T* __restrict__ W, T* Y, const T* R, const T* __restrict__ LW, \
    const T* __restrict__ LB, int N, int K, long long sx, long long sy, long long sr, float eps, int flags, \
    int tpr, int ring, int xs_bytes, unsigned long long* trace) { \
    gemv_body<MM>(X, W, Y, R, LW, LB, N, K, sx, sy, sr, eps, flags, tpr, ring, xs_bytes, trace); }
KERNEL(1)
KERNEL(2)
KERNEL(3)
KERNEL(4)
"""

ELT_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
THREADS = 256
RING_BYTES = 96 * 1024  # shared memory for weight stages per program: ~half an SM's, so two GEMVs fit on an SM
CTAS_PER_SM = 1
# percent of L1 as shared memory, so that the next GEMV's programs fit beside this one's (the driver's own choice, -1,
# measured the same: bench/results/gemv-stream-h100-carveout.txt)
CARVEOUT = 100
VECS_PER_THREAD = 8  # a row's 16-byte vectors per thread and stage, at most (sets threads per row)
_MAXS, _MAXM = 16, 4
_lock = threading.Lock()
_modules: dict = {}  # (device index, key) -> (functions, SMs, shared memory a program may have) or an Exception


class _LaunchAttr(ctypes.Structure):
    # CUlaunchAttribute: the id, padding to 8 bytes, a 64-byte union whose first int is the value used here
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_int), ("value", ctypes.c_int), ("rest", ctypes.c_int * 15)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttr)), ("numAttrs", ctypes.c_uint)]


_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
_CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT = 9


def _nvrtc() -> ctypes.CDLL:
    """NVRTC: the library torch's CUDA wheels ship (nvidia/cuda_nvrtc or nvidia/cu13), else the system's."""
    major = (torch.version.cuda or "12").split(".")[0]
    site = os.path.dirname(os.path.dirname(torch.__file__))
    names = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*"))) + [f"libnvrtc.so.{major}",
                                                                                          "libnvrtc.so"]
    errors = []
    for name in names:
        if "builtins" in name or "alt" in os.path.basename(name):
            continue
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e))
    raise OSError("NVRTC not found: " + "; ".join(errors[-2:]))


def _check(lib, rc, what):
    if rc != 0:
        msg = ctypes.c_char_p()
        lib.cuGetErrorString(rc, ctypes.byref(msg))
        raise RuntimeError(f"{what} failed: {rc} {msg.value.decode() if msg.value else ''}")


def compile_cubin(src: str, arch: str) -> bytes:
    """CUDA C++ `src` compiled by NVRTC for `arch` (e.g. "sm_90")."""
    nv = _nvrtc()
    prog = ctypes.c_void_p()
    rc = nv.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"stream.cu", 0, None, None)
    if rc:
        raise RuntimeError(f"nvrtcCreateProgram failed: {rc}")
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = nv.nvrtcCompileProgram(prog, len(opts), arr)
    if rc:
        size = ctypes.c_size_t()
        nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nv.nvrtcGetProgramLog(prog, log)
        nv.nvrtcDestroyProgram(ctypes.byref(prog))
        raise RuntimeError("NVRTC could not compile:\n" + log.value.decode(errors="replace"))
    size = ctypes.c_size_t()
    nv.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    nv.nvrtcGetCUBIN(prog, cubin)
    nv.nvrtcDestroyProgram(ctypes.byref(prog))
    return cubin.raw


_cuda = None


def _driver() -> ctypes.CDLL:
    global _cuda
    if _cuda is None:
        _cuda = ctypes.CDLL("libcuda.so.1")
        _cuda.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                                           ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        _cuda.cuModuleLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
        _cuda.cuModuleGetFunction.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
        _cuda.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    return _cuda


def load(device: torch.device, key, src: str, names: list[str]):
    """The kernels `names` of CUDA C++ `src` on `device` (compiled once per key): (functions, SMs, shared memory a
    program may have), each function allowed all of it."""
    key = (device.index if device.index is not None else torch.cuda.current_device(), key)
    with _lock:
        got = _modules.get(key)
        if got is None:
            try:
                with torch.cuda.device(key[0]):
                    torch.cuda.init()
                    torch.empty(1, device=device)  # makes the device's primary context current in this thread
                    major, minor = torch.cuda.get_device_capability(key[0])
                    if major < 9:
                        raise RuntimeError(f"needs compute capability 9.0+ (bulk copies), this GPU is {major}.{minor}")
                    cubin = compile_cubin(src, f"sm_{major}{minor}")
                    cu = _driver()
                    mod = ctypes.c_void_p()
                    _check(cu, cu.cuModuleLoadData(ctypes.byref(mod), cubin), "cuModuleLoadData")
                    props = torch.cuda.get_device_properties(key[0])
                    smem_max = int(getattr(props, "shared_memory_per_block_optin", 227 * 1024))
                    fns = []
                    for name in names:
                        fn = ctypes.c_void_p()
                        _check(cu, cu.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode()), "cuModuleGetFunction")
                        _check(cu, cu.cuFuncSetAttribute(fn, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                         smem_max), "cuFuncSetAttribute")
                        # all of L1 as shared memory: else the driver sizes the carveout for one program, and the
                        # next GEMV's programs cannot start beside this one's
                        _check(cu, cu.cuFuncSetAttribute(fn, _CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                                                         CARVEOUT), "cuFuncSetAttribute")
                        fns.append(fn)
                    got = (fns, props.multi_processor_count, smem_max)
            except Exception as e:  # no NVRTC, an older GPU or driver: remembered, raised on every use
                got = e
            _modules[key] = got
    if isinstance(got, Exception):
        raise got
    return got


def _function(device: torch.device, dtype: torch.dtype):
    """stream_gemv_1..4 (one kernel per row count M) for weights of `dtype`."""
    return load(device, ("stream_gemv", dtype), f"#define ELT {ELT_CODES[dtype]}\n" + _SOURCE,
                [f"stream_gemv_{m}" for m in range(1, _MAXM + 1)])


def launch(fn, grid: int, threads: int, smem: int, args: list, device, pdl: bool = False):
    """fn<<<grid, threads, smem>>>(*args) on the current stream (args: ctypes values), a programmatic dependent of
    the previous kernel with pdl."""
    params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
    attrs = (_LaunchAttr * 1)()
    if pdl:
        attrs[0].id = _CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attrs[0].value = 1
    cfg = _LaunchConfig(grid, 1, 1, threads, 1, 1, smem, ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream),
                        attrs, 1 if pdl else 0)
    cu = _driver()
    _check(cu, cu.cuLaunchKernelEx(ctypes.byref(cfg), fn, params, None), "cuLaunchKernelEx")


def unavailable_reason(device, dtype) -> str | None:
    """Why stream_gemv cannot run on `device` for weights of `dtype`, or None (compiles the kernel on first call)."""
    try:
        _function(torch.device(device), dtype)
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def supports(x: torch.Tensor, w: torch.Tensor) -> bool:
    """The shapes and layouts stream_gemv takes: at most 4 rows, W contiguous with 16-byte rows."""
    M, K = x.shape
    return (M <= _MAXM and w.is_contiguous() and x.stride(1) == 1 and w.dtype == x.dtype
            and (K * w.element_size()) % 16 == 0 and w.data_ptr() % 16 == 0)


def plan(M: int, N: int, K: int, elt: int, sms: int, smem_max: int, *, ln: bool = False, ring_bytes: int | None = None,
         ctas_per_sm: int | None = None, vecs_per_thread: int | None = None, threads: int | None = None):
    """(grid, threads per row, ring stages, x bytes, shared memory bytes, threads per program) for an M x K by N x K
    GEMV."""
    ring_bytes = RING_BYTES if ring_bytes is None else ring_bytes
    ctas_per_sm = CTAS_PER_SM if ctas_per_sm is None else ctas_per_sm
    vpt = VECS_PER_THREAD if vecs_per_thread is None else vecs_per_thread
    kv = K * elt // 16
    tpr = 1
    threads = THREADS if threads is None else threads
    while tpr < threads and tpr * vpt < kv:
        tpr *= 2
    tpr = max(tpr, 8)
    rpp = threads // tpr
    grid = max(1, min(sms * ctas_per_sm, N))
    rows = -(-N // grid)
    stage = rpp * K * elt
    xs = -(-M * K * elt // 128) * 128
    lnb = -(-2 * K * elt // 128) * 128 if ln else 0
    ring = max(1, min(_MAXS - 1, -(-rows // rpp), ring_bytes // stage))
    while ring > 1 and 512 + lnb + xs + ring * stage > smem_max:
        ring -= 1
    smem = 512 + lnb + xs + ring * stage
    if smem > smem_max:
        raise ValueError(f"stream_gemv: a {K}-wide row of {elt} bytes needs {smem} bytes of shared memory")
    return grid, tpr, ring, xs, smem, threads


def stream_gemv(x, w, *, ln=None, eps=1e-5, gelu=False, res=None, out=None, pdl=False, early=False,
                stream_only=False, trace=None, **plan_kw):
    """out (M, N) = x (M, K) @ w (N, K)^T, as lib.musicgen_fast._gemv: ln=(weight, bias) normalizes x first, gelu
    applies the exact GELU, res adds a residual (M, N). pdl: launched as a programmatic dependent (its weights asked
    for before it waits for the previous kernel); early: the next kernel may launch at once (it reads only
    constants before its own wait)."""
    M, K = x.shape
    N = w.shape[0]
    assert supports(x, w), (x.shape, x.stride(), w.shape, w.dtype)
    fn, sms, smem_max = _function(x.device, w.dtype)
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    assert out.stride(1) == 1 and (res is None or res.stride(1) == 1)
    grid, tpr, ring, xs, smem, threads = plan(M, N, K, w.element_size(), sms, smem_max, ln=ln is not None, **plan_kw)
    lw, lb = ln if ln is not None else (w, w)
    r = res if res is not None else out
    flags = (1 if ln is not None else 0) | (2 if gelu else 0) | (4 if res is not None else 0) \
        | (8 if pdl else 0) | (16 if pdl and early else 0) | (32 if stream_only else 0)
    args = [ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(w.data_ptr()), ctypes.c_void_p(out.data_ptr()),
            ctypes.c_void_p(r.data_ptr()), ctypes.c_void_p(lw.data_ptr()), ctypes.c_void_p(lb.data_ptr()),
            ctypes.c_int(N), ctypes.c_int(K), ctypes.c_longlong(x.stride(0)),
            ctypes.c_longlong(out.stride(0)), ctypes.c_longlong(r.stride(0)), ctypes.c_float(eps),
            ctypes.c_int(flags), ctypes.c_int(tpr), ctypes.c_int(ring), ctypes.c_int(xs),
            ctypes.c_void_p(trace.data_ptr() if trace is not None else 0)]
    launch(fn[M - 1], grid, threads, smem, args, x.device, pdl)
    return out


# ------------------------------------------------------------------------------------------------------------------
# A persistent chain of GEMVs (feasibility of a decode step whose kernels do not end): one program per SM runs every
# phase (phase p: Y_p = X_p @ W_p^T, X_p usually the output of an earlier phase) and a producer warp per program
# streams its rows of every phase's W through a ring of shared-memory slots without stopping at phase boundaries;
# the 8 consumer warps wait for the phase before (a grid-wide counter) only to read x. fp16, M <= 2 rows, no
# prologues / epilogues: what it measures is whether the weights' stream keeps HBM busy across the phases'
# dependencies, which separate kernels (the Triton step, stream_gemv) did not (bench/README.md, session 10).
_CHAIN_SOURCE = r"""
typedef unsigned short T;
struct Phase { const T* X; const T* W; T* Y; long long sx, sy; int N, K; };
#define NSLOTS_MAX 32
#define F_NO_COMPUTE 1
#define F_NO_BARRIER 2
#define F_CP_ASYNC 4  // the producer warp copies with 16-byte cp.async per lane instead of one bulk copy (TMA)
#define F_X_SCALAR 8  // x read in 2-byte loads (session 10's measurements) instead of 16-byte ones issued up front
#define XV_MAX 8  // 16-byte vectors of x per consumer thread: M * K <= 8 * 256 * 8 (2 rows of 8192)

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned phase) {
    asm volatile("{\n .reg .pred p;\n WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
                 " @!p bra WAIT;\n}\n" :: "r"(bar), "r"(phase) : "memory");
}
__device__ __forceinline__ float h2f(unsigned short v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f; }
__device__ __forceinline__ unsigned short f2h(float f) { unsigned short v; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f)); return v; }
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, 256;" ::: "memory"); }

// rows per slot: the largest power of two of whole rows that fits, at most 8
__device__ __forceinline__ int rows_per_slot(int K, int slot_bytes) {
    int r = 1;
    while (r < 8 && 2 * r * K * 2 <= slot_bytes) r *= 2;
    return r;
}

extern "C" __global__ void __launch_bounds__(288) stream_chain(
    const Phase* __restrict__ phases, int nphases, unsigned* done, int M, int slot_bytes, int nslots, int xs_bytes,
    int flags)
{
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned long long* full = (unsigned long long*)smem;
    unsigned long long* empty = full + NSLOTS_MAX;
    float* red = (float*)(smem + 512);
    T* xs = (T*)(smem + 1024);
    unsigned char* ring = smem + 1024 + xs_bytes;
    const int tid = threadIdx.x, G = gridDim.x, b = blockIdx.x;
    if (tid == 0) {
        const unsigned arrivals = (flags & F_CP_ASYNC) ? 32 : 1;
        for (int i = 0; i < nslots; i++) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem_addr(full + i)), "r"(arrivals));
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_addr(empty + i)));
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (tid >= 256 && (flags & F_CP_ASYNC)) {  // the producer warp, every lane copying 16 bytes at a time
        const int pl = tid - 256;
        unsigned g = 0;
        for (int p = 0; p < nphases; p++) {
            const Phase ph = phases[p];
            const int n0 = (int)((long long)b * ph.N / G), rows = (int)((long long)(b + 1) * ph.N / G) - n0;
            const int rps = rows_per_slot(ph.K, slot_bytes), nst = (rows + rps - 1) / rps;
            const char* src = (const char*)(ph.W + (long long)n0 * ph.K);
            for (int s = 0; s < nst; s++, g++) {
                const int slot = g % nslots;
                if (g >= (unsigned)nslots) mbar_wait(smem_addr(empty + slot), ((g / nslots) - 1) & 1);
                const unsigned bytes = min(rps, rows - s * rps) * ph.K * 2;
                const unsigned dst = smem_addr(ring + slot * slot_bytes);
                const char* from = src + (long long)s * rps * ph.K * 2;
                for (unsigned off = pl * 16; off < bytes; off += 512)
                    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst + off), "l"(from + off) : "memory");
                asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" :: "r"(smem_addr(full + slot)) : "memory");
            }
        }
        asm volatile("cp.async.wait_all;" ::: "memory");
        return;
    }
    if (tid >= 256) {  // the producer warp: one thread walks every phase's stages
        if (tid == 256) {
            unsigned long long policy;
            asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
            unsigned g = 0;
            for (int p = 0; p < nphases; p++) {
                const Phase ph = phases[p];
                const int n0 = (int)((long long)b * ph.N / G), rows = (int)((long long)(b + 1) * ph.N / G) - n0;
                const int rps = rows_per_slot(ph.K, slot_bytes), nst = (rows + rps - 1) / rps;
                const char* src = (const char*)(ph.W + (long long)n0 * ph.K);
                for (int s = 0; s < nst; s++, g++) {
                    const int slot = g % nslots;
                    if (g >= (unsigned)nslots) mbar_wait(smem_addr(empty + slot), ((g / nslots) - 1) & 1);
                    const unsigned bytes = min(rps, rows - s * rps) * ph.K * 2, fb = smem_addr(full + slot);
                    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(fb), "r"(bytes) : "memory");
                    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
                                 :: "r"(smem_addr(ring + slot * slot_bytes)), "l"(src + (long long)s * rps * ph.K * 2),
                                    "r"(bytes), "r"(fb), "l"(policy) : "memory");
                }
            }
        }
        return;
    }
    const int lane = tid & 31, warp = tid >> 5;
    unsigned g = 0;
    for (int p = 0; p < nphases; p++) {
        const Phase ph = phases[p];
        const int K = ph.K, kv = K / 8;
        const int n0 = (int)((long long)b * ph.N / G), rows = (int)((long long)(b + 1) * ph.N / G) - n0;
        const int rps = rows_per_slot(K, slot_bytes), nst = (rows + rps - 1) / rps, tpr = 256 / rps, wpr = tpr / 32;
        if (p > 0 && !(flags & F_NO_BARRIER)) {  // every program done with the phase before
            if (tid == 0) {
                unsigned v;
                do { asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(done)); } while (v < (unsigned)(G * p));
            }
            consumers_sync();
        }
        if (flags & F_X_SCALAR) {  // as measured in session 10: 2-byte loads, M * K / 256 of them per thread
            for (int m = 0; m < M; m++)
                for (int k = tid; k < K; k += 256) {  // L2, not L1: other SMs wrote it in this launch
                    unsigned short v;
                    asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(v) : "l"(ph.X + m * ph.sx + k));
                    xs[m * K + k] = v;
                }
        } else {  // every 16-byte load of x issued before the first store: one L2 round trip per phase
            const int kv8 = K / 8, nv = M * kv8;
            uint4 xv[XV_MAX];
            #pragma unroll
            for (int j = 0; j < XV_MAX; j++) {
                const int i = tid + j * 256;
                if (i < nv) {
                    const T* src = ph.X + (i / kv8) * ph.sx + (i % kv8) * 8;
                    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                                 : "=r"(xv[j].x), "=r"(xv[j].y), "=r"(xv[j].z), "=r"(xv[j].w) : "l"(src));
                }
            }
            #pragma unroll
            for (int j = 0; j < XV_MAX; j++) {
                const int i = tid + j * 256;
                if (i < nv) ((uint4*)xs)[i] = xv[j];
            }
        }
        consumers_sync();
        const int r = tid / tpr, li = tid % tpr;
        for (int s = 0; s < nst; s++, g++) {
            const int slot = g % nslots;
            mbar_wait(smem_addr(full + slot), (g / nslots) & 1);
            float acc0 = 0.f, acc1 = 0.f;
            const int row = s * rps + r;
            if (row < rows && !(flags & F_NO_COMPUTE)) {
                const uint4* wv = (const uint4*)(ring + slot * slot_bytes + r * K * 2);
                const uint4* x0 = (const uint4*)xs;
                const uint4* x1 = (const uint4*)(xs + K);
                for (int i = li; i < kv; i += tpr) {
                    const uint4 w = wv[i], a = x0[i];
                    const unsigned wa[4] = {w.x, w.y, w.z, w.w}, xa[4] = {a.x, a.y, a.z, a.w};
                    float wf[8];
                    #pragma unroll
                    for (int e = 0; e < 4; e++) {
                        wf[2 * e] = h2f(wa[e] & 0xffff); wf[2 * e + 1] = h2f(wa[e] >> 16);
                        acc0 += wf[2 * e] * h2f(xa[e] & 0xffff) + wf[2 * e + 1] * h2f(xa[e] >> 16);
                    }
                    if (M > 1) {
                        const uint4 c = x1[i];
                        const unsigned xc[4] = {c.x, c.y, c.z, c.w};
                        #pragma unroll
                        for (int e = 0; e < 4; e++) acc1 += wf[2 * e] * h2f(xc[e] & 0xffff) + wf[2 * e + 1] * h2f(xc[e] >> 16);
                    }
                }
            }
            for (int o = (tpr < 32 ? tpr : 32) / 2; o > 0; o >>= 1) {
                acc0 += __shfl_xor_sync(0xffffffffu, acc0, o);
                acc1 += __shfl_xor_sync(0xffffffffu, acc1, o);
            }
            float* part = red + (g & 1) * 16;
            if (wpr > 1 && lane == 0) { part[warp * 2] = acc0; part[warp * 2 + 1] = acc1; }
            consumers_sync();  // the slot is read: the producer may refill it
            if (tid == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(smem_addr(empty + slot)) : "memory");
            if (li == 0 && row < rows) {
                if (wpr > 1) {
                    acc0 = 0.f; acc1 = 0.f;
                    for (int w = 0; w < wpr; w++) { acc0 += part[(r * wpr + w) * 2]; acc1 += part[(r * wpr + w) * 2 + 1]; }
                }
                ph.Y[n0 + row] = f2h(acc0);
                if (M > 1) ph.Y[ph.sy + n0 + row] = f2h(acc1);
            }
        }
        __threadfence();
        consumers_sync();
        if (tid == 0) atomicAdd(done, 1u);
    }
}
"""


def chain_table(steps):
    """The phase table of the chain `steps` = [(x (M, K), w (N, K), y (M, N)), ...] (fp16; x of a step may be an
    earlier step's y) on the GPU, for stream_chain (built outside a graph capture)."""
    import struct
    rec = []
    for x, w, y in steps:
        assert w.is_contiguous() and x.stride(1) == 1 and y.stride(1) == 1 and w.dtype == torch.float16
        rec.append(struct.pack("QQQqqii", x.data_ptr(), w.data_ptr(), y.data_ptr(), x.stride(0), y.stride(0),
                               w.shape[0], w.shape[1]))
    return torch.frombuffer(bytearray(b"".join(rec)), dtype=torch.uint8).to(steps[0][1].device), \
        max(w.shape[1] for _, w, _ in steps), len(steps)


def stream_chain(table, M: int, done, *, slot_kb: int = 24, no_compute=False, no_barrier=False, cp_async=False,
                 x_scalar=False):
    """Runs a chain_table as one persistent launch (see _CHAIN_SOURCE). `done`: a zeroed int32 counter.
    x_scalar: each phase's x read in 2-byte loads (as session 10 measured it)."""
    table, K_max, n = table
    dev = table.device
    (fn,), sms, smem_max = load(dev, "stream_chain", _CHAIN_SOURCE, ["stream_chain"])
    xs = -(-M * K_max * 2 // 128) * 128
    slot = slot_kb * 1024
    nslots = min(32, (smem_max - 1024 - xs) // slot)
    smem = 1024 + xs + nslots * slot
    args = [ctypes.c_void_p(table.data_ptr()), ctypes.c_int(n), ctypes.c_void_p(done.data_ptr()),
            ctypes.c_int(M), ctypes.c_int(slot), ctypes.c_int(nslots), ctypes.c_int(xs),
            ctypes.c_int((1 if no_compute else 0) | (2 if no_barrier else 0) | (4 if cp_async else 0)
                         | (8 if x_scalar else 0))]
    assert M * K_max <= 8 * 256 * 8 and K_max % 8 == 0, "x must fit XV_MAX 16-byte vectors per consumer thread"
    launch(fn, sms, 288, smem, args, dev)
