// WKV CUDA kernels: one thread per (batch, channel), running the functions of wkv4_math.h with one lane.
// The backward's per-step scratch (RWKV-LM's q[], r[]) lives in a (2, B, T, C) float buffer that the binding
// takes from PyTorch's caching allocator, laid out so that adjacent threads touch adjacent words. There is
// no compile-time T_MAX and no per-thread local array (which the driver would reserve for every resident
// thread, gigabytes outside PyTorch's allocator at long T).
#include <cuda_runtime.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "wkv4_math.h"

namespace {

template <typename F, typename IO>
__global__ void wkv_forward_kernel(int B, int T, int C, long long bs, const F *__restrict__ w,
                                   const F *__restrict__ u, const IO *__restrict__ k, const IO *__restrict__ v,
                                   IO *__restrict__ y, F *__restrict__ state) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * C) return;
    const int b = idx / C, c = idx % C;
    const long long o = b * bs + c;
    wkv_math::forward_lanes<1, F, IO>(T, C, w + c, u + c, k + o, v + o, y + o, state + idx, (long long)B * C);
}

template <typename F, typename IO>
__global__ void wkv_backward_kernel(int B, int T, int C, long long bs, const F *__restrict__ w,
                                    const F *__restrict__ u, const IO *__restrict__ k, const IO *__restrict__ v,
                                    const IO *__restrict__ y, const IO *__restrict__ gy, const F *__restrict__ state,
                                    F *__restrict__ gstate, F *__restrict__ gw, F *__restrict__ gu,
                                    IO *__restrict__ gk, IO *__restrict__ gv, F *__restrict__ scratch) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * C) return;
    const int b = idx / C, c = idx % C;
    const long long o = b * bs + c;
    F *q = scratch + (long long)b * T * C + c;  // q: scratch[0, b, t, c]; r: scratch[1, b, t, c]
    F *r = q + (long long)B * T * C;
    wkv_math::backward_lanes<1, F, IO>(T, C, w + c, u + c, k + o, v + o, y + o, gy + o, state + idx, gstate + idx,
                                       (long long)B * C, gw + idx, gu + idx, gk + o, gv + o, q, r, C);
}

// 32 threads per block as RWKV-LM: the kernels are register-heavy and latency-bound.
constexpr int kThreads = 32;

inline dim3 blocks_for(int B, int C) { return dim3((B * C + kThreads - 1) / kThreads); }

}  // namespace

#define WKV_CUDA_LAUNCHERS(NAME, F, IO)                                                                       \
    void wkv_cuda_forward_##NAME(int B, int T, int C, long long bs, const F *w, const F *u, const IO *k,      \
                                 const IO *v, IO *y, F *state, cudaStream_t stream) {                          \
        wkv_forward_kernel<F, IO><<<blocks_for(B, C), kThreads, 0, stream>>>(B, T, C, bs, w, u, k, v, y, state); \
    }                                                                                                         \
    void wkv_cuda_backward_##NAME(int B, int T, int C, long long bs, const F *w, const F *u, const IO *k,     \
                                  const IO *v, const IO *y, const IO *gy, const F *state, F *gstate, F *gw,   \
                                  F *gu, IO *gk, IO *gv, F *scratch, cudaStream_t stream) {                   \
        wkv_backward_kernel<F, IO><<<blocks_for(B, C), kThreads, 0, stream>>>(                                \
            B, T, C, bs, w, u, k, v, y, gy, state, gstate, gw, gu, gk, gv, scratch);                          \
    }

WKV_CUDA_LAUNCHERS(fp32, float, float)
WKV_CUDA_LAUNCHERS(bf16, float, c10::BFloat16)
WKV_CUDA_LAUNCHERS(fp16, float, c10::Half)
