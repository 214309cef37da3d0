// WKV-7 CUDA kernels: one block of N = 64 threads per (batch, head), thread i running the row worker i of
// wkv7_math.h. The forward keeps row i of S in registers (the header's loops are fully unrolled, so the
// row is indexed by constants only). The backward keeps row i of G = dL/dS in registers and column i of S
// and of G in shared memory: three register rows do not fit in 255 registers (ptxas spilled to local
// memory). Shared rows are padded to N + 1 words, so thread i's word j sits in bank (i + j) % 32: no bank
// conflicts. No kernel has a stack frame (ptxas -v; a test checks it). The step's vectors go through
// shared memory; the scratch (state checkpoints every CHUNK steps, sa per step) comes from PyTorch's
// allocator, allocated in Python and passed in.
//
// Layouts (all contiguous): r, w, k, v, a, b, y, sa and their gradients (B, T, H, N); state in/out and its
// adjoints (B, H, N, N) as [value i, key j]; checkpoints (B, H, checkpoint_count(T), N, N) holding S
// transposed ([key j, value i]), so that the forward's stores are coalesced.
#include <cuda_runtime.h>
#include <c10/util/BFloat16.h>

#include "wkv7_math.h"

namespace {

constexpr int N = 64;
using wkv7_math::index_t;

template <typename IO>
__device__ __forceinline__ float ld(const IO *p, index_t i) { return static_cast<float>(p[i]); }

template <typename IO>
__global__ void __launch_bounds__(N) wkv7_forward_kernel(
    int T, int H, const IO *__restrict__ r_, const IO *__restrict__ w_, const IO *__restrict__ k_,
    const IO *__restrict__ v_, const IO *__restrict__ a_, const IO *__restrict__ b_, const float *__restrict__ s0,
    IO *__restrict__ y_, float *__restrict__ s_out, float *__restrict__ ckpt, float *__restrict__ sa_) {
    const int bb = blockIdx.y, hh = blockIdx.x, i = threadIdx.x;
    const index_t bh = (index_t)bb * H + hh;
    __shared__ float r[N], d[N], k[N], a[N], b[N];

    float s[N];
#pragma unroll
    for (int j = 0; j < N; j++) s[j] = s0[(bh * N + i) * N + j];

    const index_t ckpt_base = bh * wkv7_math::checkpoint_count(T) * N * N;
    for (int t = 0; t < T; t++) {
        const index_t ind = (((index_t)bb * T + t) * H + hh) * N + i;
        __syncthreads();  // everyone is done with the previous step's vectors
        r[i] = ld(r_, ind);
        d[i] = wkv7_math::decay(ld(w_, ind));
        k[i] = ld(k_, ind);
        a[i] = ld(a_, ind);
        b[i] = ld(b_, ind);
        const float v_i = ld(v_, ind);
        __syncthreads();

        float sa;
        const float y = wkv7_math::forward_row<N, float>(s, r, d, k, a, b, v_i, sa);
        y_[ind] = static_cast<IO>(y);
        sa_[ind] = sa;
        const int slot = wkv7_math::checkpoint_slot(t, T);
        if (slot >= 0) {
            float *c = ckpt + ckpt_base + (index_t)slot * N * N + i;
#pragma unroll
            for (int j = 0; j < N; j++) c[j * N] = s[j];  // transposed: threads write adjacent words
        }
    }
#pragma unroll
    for (int j = 0; j < N; j++) s_out[(bh * N + i) * N + j] = s[j];
}

template <typename IO>
__global__ void __launch_bounds__(N) wkv7_backward_kernel(
    int T, int H, const IO *__restrict__ r_, const IO *__restrict__ w_, const IO *__restrict__ k_,
    const IO *__restrict__ v_, const IO *__restrict__ a_, const IO *__restrict__ b_, const IO *__restrict__ gy_,
    const float *__restrict__ ckpt, const float *__restrict__ sa_, const float *__restrict__ gs_out,
    float *__restrict__ gs_in, IO *__restrict__ gr_, IO *__restrict__ gw_, IO *__restrict__ gk_,
    IO *__restrict__ gv_, IO *__restrict__ ga_, IO *__restrict__ gb_) {
    const int bb = blockIdx.y, hh = blockIdx.x, i = threadIdx.x;
    const index_t bh = (index_t)bb * H + hh;
    __shared__ float r[N], d[N], k[N], v[N], a[N], b[N], gy[N], sa[N], gsa[N];

    // Row i of G = dL/dS (starting from dL/dS_T) in registers; column i of S and of G in shared memory.
    __shared__ float gt_rows[N * (N + 1)], st_rows[N * (N + 1)];
    float *gt = gt_rows + i * (N + 1), *st = st_rows + i * (N + 1);
    float g[N];
#pragma unroll
    for (int j = 0; j < N; j++) {
        g[j] = gs_out[(bh * N + i) * N + j];
        gt[j] = gs_out[(bh * N + j) * N + i];
        st[j] = 0;
    }

    const index_t ckpt_base = bh * wkv7_math::checkpoint_count(T) * N * N;
    for (int t = T - 1; t >= 0; t--) {
        const index_t ind = (((index_t)bb * T + t) * H + hh) * N + i;
        const float w_i = ld(w_, ind);
        __syncthreads();  // everyone is done with the previous step's vectors (and gsa)
        r[i] = ld(r_, ind);
        d[i] = wkv7_math::decay(w_i);
        k[i] = ld(k_, ind);
        v[i] = ld(v_, ind);
        a[i] = ld(a_, ind);
        b[i] = ld(b_, ind);
        gy[i] = ld(gy_, ind);
        sa[i] = sa_[ind];
        __syncthreads();

        const int slot = wkv7_math::checkpoint_slot(t, T);
        if (slot >= 0) {  // restart from the stored S_t (its column i)
            const float *c = ckpt + ckpt_base + (index_t)slot * N * N + (index_t)i * N;
#pragma unroll
            for (int j = 0; j < N; j++) st[j] = c[j];
        }
        const wkv7_math::RowGrads<float> gr =
            wkv7_math::backward_row_a<N, float>(st, g, gt, r, k, v, b, sa, gy, r[i], d[i], k[i], b[i], gy[i]);
        gr_[ind] = static_cast<IO>(gr.r);
        gw_[ind] = static_cast<IO>(gr.d * wkv7_math::ddecay_dw(w_i));
        gk_[ind] = static_cast<IO>(gr.k);
        gv_[ind] = static_cast<IO>(gr.v);
        gb_[ind] = static_cast<IO>(gr.b);
        gsa[i] = gr.sa;
        __syncthreads();
        ga_[ind] = static_cast<IO>(wkv7_math::backward_row_b<N, float>(st, g, gt, d, a, gsa, d[i], a[i], gr.sa));
    }
#pragma unroll
    for (int j = 0; j < N; j++) gs_in[(bh * N + i) * N + j] = g[j];
}

}  // namespace

#define WKV7_CUDA_LAUNCHERS(NAME, IO)                                                                         \
    void wkv7_cuda_forward_##NAME(int B, int T, int H, const IO *r, const IO *w, const IO *k, const IO *v,    \
                                  const IO *a, const IO *b, const float *s0, IO *y, float *s_out, float *ckpt, \
                                  float *sa, cudaStream_t stream) {                                           \
        wkv7_forward_kernel<IO><<<dim3(H, B), N, 0, stream>>>(T, H, r, w, k, v, a, b, s0, y, s_out, ckpt, sa); \
    }                                                                                                         \
    void wkv7_cuda_backward_##NAME(int B, int T, int H, const IO *r, const IO *w, const IO *k, const IO *v,   \
                                   const IO *a, const IO *b, const IO *gy, const float *ckpt, const float *sa, \
                                   const float *gs_out, float *gs_in, IO *gr, IO *gw, IO *gk, IO *gv, IO *ga, \
                                   IO *gb, cudaStream_t stream) {                                             \
        wkv7_backward_kernel<IO><<<dim3(H, B), N, 0, stream>>>(T, H, r, w, k, v, a, b, gy, ckpt, sa, gs_out,    \
                                                               gs_in, gr, gw, gk, gv, ga, gb);                \
    }

WKV7_CUDA_LAUNCHERS(fp32, float)
WKV7_CUDA_LAUNCHERS(bf16, c10::BFloat16)
