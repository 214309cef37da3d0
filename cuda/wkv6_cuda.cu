// WKV-6 CUDA kernels: one block of N = 64 threads per (batch, head), as RWKV-LM's v6 kernel. The forward's
// thread j is the column worker j of wkv6_math.h and keeps column j of S in registers (the header's loops
// are fully unrolled, so the column is indexed by constants only); y_j needs no exchange between threads.
// The backward's thread c is the row worker c: row c of G = dL/dS in registers, column c of G in shared
// memory (rows padded to N + 1 words, so thread c's word j sits in bank (c + j) % 32: no bank conflicts),
// and per chunk of CHUNK steps it first recomputes row c of the chunk's states from the forward's
// checkpoint (in registers) into scratch, then walks the chunk down reading them back. A thread reads only
// the scratch words it wrote itself, so the scratch needs no barrier. The step's vectors go through shared
// memory. Checkpoints and scratch come from PyTorch's allocator, allocated in Python and passed in; no
// kernel has a stack frame (ptxas -v; a test checks it).
//
// Layouts (all contiguous): r, w, k, v, y and their gradients (B, T, H, N); u (H, N) fp32; state in/out
// and its adjoints (B, H, N, N) as [key i, value j]; checkpoints (B, H, checkpoint_count(T), N, N) as
// [key i, value j] (the forward's thread j writes word j of each row: coalesced); scratch (B, H, CHUNK, N,
// N) as [step][value j][key c] (the backward's thread c writes word c: coalesced); gu (B, H, N) fp32,
// dL/du summed over time.
#include <cuda_runtime.h>
#include <c10/util/BFloat16.h>

#include "wkv6_math.h"

namespace {

constexpr int N = 64;
constexpr int CHUNK = wkv6_math::CHUNK;
using wkv6_math::index_t;

template <typename IO>
__device__ __forceinline__ float ld(const IO *p, index_t i) { return static_cast<float>(p[i]); }

template <typename IO>
__global__ void __launch_bounds__(N) wkv6_forward_kernel(
    int T, int H, const IO *__restrict__ r_, const IO *__restrict__ w_, const IO *__restrict__ k_,
    const IO *__restrict__ v_, const float *__restrict__ u_, const float *__restrict__ s0, IO *__restrict__ y_,
    float *__restrict__ s_out, float *__restrict__ ckpt) {
    const int bb = blockIdx.y, hh = blockIdx.x, j = threadIdx.x;
    const index_t bh = (index_t)bb * H + hh;
    __shared__ float r[N], u[N], k[N], d[N];
    u[j] = u_[(index_t)hh * N + j];

    float s[N];  // column j of S: s[i] = S[i, j]
#pragma unroll
    for (int i = 0; i < N; i++) s[i] = s0[(bh * N + i) * N + j];

    const index_t ckpt_base = bh * wkv6_math::checkpoint_count(T) * N * N;
    for (int t = 0; t < T; t++) {
        if (t % CHUNK == 0) {  // S before step t
            float *c = ckpt + ckpt_base + (index_t)(t / CHUNK) * N * N + j;
#pragma unroll
            for (int i = 0; i < N; i++) c[i * N] = s[i];
        }
        const index_t ind = (((index_t)bb * T + t) * H + hh) * N + j;
        __syncthreads();  // everyone is done with the previous step's vectors (and u is stored)
        r[j] = ld(r_, ind);
        k[j] = ld(k_, ind);
        d[j] = wkv6_math::decay(ld(w_, ind));
        const float v_j = ld(v_, ind);
        __syncthreads();
        y_[ind] = static_cast<IO>(wkv6_math::forward_col<N, float>(s, r, u, k, d, v_j));
    }
#pragma unroll
    for (int i = 0; i < N; i++) s_out[(bh * N + i) * N + j] = s[i];
}

template <typename IO>
__global__ void __launch_bounds__(N) wkv6_backward_kernel(
    int T, int H, const IO *__restrict__ r_, const IO *__restrict__ w_, const IO *__restrict__ k_,
    const IO *__restrict__ v_, const float *__restrict__ u_, const IO *__restrict__ gy_,
    const float *__restrict__ ckpt, const float *__restrict__ gs_out, float *__restrict__ scratch,
    float *__restrict__ gs_in, IO *__restrict__ gr_, IO *__restrict__ gw_, IO *__restrict__ gk_,
    IO *__restrict__ gv_, float *__restrict__ gu_) {
    const int bb = blockIdx.y, hh = blockIdx.x, c = threadIdx.x;
    const index_t bh = (index_t)bb * H + hh;
    __shared__ float r[N], u[N], k[N], v[N], d[N], gy[N];
    __shared__ float gt_rows[N * (N + 1)];
    float *gt = gt_rows + c * (N + 1);  // column c of G: gt[j] = G[j, c]
    float *buf = scratch + bh * CHUNK * N * N + c;  // row c of S_{t-1}: word j of step tt at [(tt * N + j) * N]
    u[c] = u_[(index_t)hh * N + c];

    float g[N];  // row c of G (from dL/dS_T)
#pragma unroll
    for (int j = 0; j < N; j++) {
        g[j] = gs_out[(bh * N + c) * N + j];
        gt[j] = gs_out[(bh * N + j) * N + c];
    }
    float gu = 0;

    const int n_ckpt = wkv6_math::checkpoint_count(T);
    const index_t ckpt_base = bh * n_ckpt * N * N;
    for (int chunk = n_ckpt - 1; chunk >= 0; chunk--) {
        const int t0 = chunk * CHUNK, t1 = min(T, t0 + CHUNK);
        float s[N];  // row c of the recomputed state
        const float *cp = ckpt + ckpt_base + (index_t)chunk * N * N + (index_t)c * N;
#pragma unroll
        for (int j = 0; j < N; j++) s[j] = cp[j];
        for (int t = t0; t < t1; t++) {
            const index_t ind = (((index_t)bb * T + t) * H + hh) * N + c;
            const float k_c = ld(k_, ind), d_c = wkv6_math::decay(ld(w_, ind));
            __syncthreads();  // everyone is done with the previous step's vectors
            v[c] = ld(v_, ind);
            __syncthreads();
            float *out = buf + (index_t)(t - t0) * N * N;
#pragma unroll
            for (int j = 0; j < N; j++) out[j * N] = s[j];
            wkv6_math::advance_row<N, float>(s, v, d_c, k_c);
        }
        for (int t = t1 - 1; t >= t0; t--) {
            const index_t ind = (((index_t)bb * T + t) * H + hh) * N + c;
            const float w_c = ld(w_, ind);
            __syncthreads();  // everyone is done with the previous step's vectors
            r[c] = ld(r_, ind);
            k[c] = ld(k_, ind);
            v[c] = ld(v_, ind);
            d[c] = wkv6_math::decay(w_c);
            gy[c] = ld(gy_, ind);
            __syncthreads();
            const wkv6_math::RowGrads<float> gr = wkv6_math::backward_row<N, N, float>(
                buf + (index_t)(t - t0) * N * N, g, gt, r, u, k, v, d, gy, r[c], u[c], k[c], d[c], gy[c]);
            gr_[ind] = static_cast<IO>(gr.r);
            gw_[ind] = static_cast<IO>(gr.d * wkv6_math::ddecay_dw(w_c));
            gk_[ind] = static_cast<IO>(gr.k);
            gv_[ind] = static_cast<IO>(gr.v);
            gu += gr.u;
        }
    }
#pragma unroll
    for (int j = 0; j < N; j++) gs_in[(bh * N + c) * N + j] = g[j];
    gu_[bh * N + c] = gu;
}

}  // namespace

#define WKV6_CUDA_LAUNCHERS(NAME, IO)                                                                        \
    void wkv6_cuda_forward_##NAME(int B, int T, int H, const IO *r, const IO *w, const IO *k, const IO *v,   \
                                  const float *u, const float *s0, IO *y, float *s_out, float *ckpt,         \
                                  cudaStream_t stream) {                                                     \
        wkv6_forward_kernel<IO><<<dim3(H, B), N, 0, stream>>>(T, H, r, w, k, v, u, s0, y, s_out, ckpt);      \
    }                                                                                                        \
    void wkv6_cuda_backward_##NAME(int B, int T, int H, const IO *r, const IO *w, const IO *k, const IO *v,  \
                                   const float *u, const IO *gy, const float *ckpt, const float *gs_out,     \
                                   float *scratch, float *gs_in, IO *gr, IO *gw, IO *gk, IO *gv, float *gu,  \
                                   cudaStream_t stream) {                                                    \
        wkv6_backward_kernel<IO><<<dim3(H, B), N, 0, stream>>>(T, H, r, w, k, v, u, gy, ckpt, gs_out,         \
                                                               scratch, gs_in, gr, gw, gk, gv, gu);          \
    }

WKV6_CUDA_LAUNCHERS(fp32, float)
WKV6_CUDA_LAUNCHERS(bf16, c10::BFloat16)
