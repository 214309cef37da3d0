// WKV-7 (RWKV-7 "x070") per-step math, written once for nvcc and for the host compiler.
//
// Per batch and head, state S (N x N, [value i, key j]), with d_t = exp(-exp(w_t)):
//     S_t = S_{t-1} (diag(d_t) + a_t b_t^T) + v_t k_t^T,      y_t = S_t r_t
// Row i of it, with sa_i = sum_j S_{t-1}[i,j] a_j:
//     S_t[i,j] = S_{t-1}[i,j] d_j + sa_i b_j + v_i k_j,         y_i = sum_j S_t[i,j] r_j
//
// The work is cut as RWKV-LM's kernel (RWKV-v7/train_temp/cuda/wkv7_cuda.cu) cuts it: one "row worker"
// per value index i owns row i of S (forward) and, in the backward, column i of S, row i and column i of
// the adjoint G = dL/dS, so that every sum over i the gradients need is a sum over j inside one worker.
// CUDA runs one worker per thread (the rows live in registers: every loop below is fully unrolled);
// the CPU twin (wkv7_cpu.cpp) runs the 64 workers of a head one after the other on rows of local
// matrices. Both call exactly these functions. The per-step vectors (r, d, k, v, a, b, gy, sa, gsa)
// are what all workers of a head share: CUDA's shared memory, a small local buffer on the host.
//
// Backward, per step t from T-1 down to 0, with G the adjoint of S_t (dL/dS_T given: chained segments):
//     G += gy_t r_t^T
//     gr_t = S_t^T gy_t,  gk_t = G^T v_t,  gv_t = G k_t,  gb_t = G^T sa_t,  gd_t[j] = sum_i G[i,j] S_{t-1}[i,j],
//     gsa = G b_t,  ga_t = S_{t-1}^T gsa,  G <- G diag(d_t) + gsa a_t^T      (the adjoint of S_{t-1})
// S_{t-1} comes from S_t by undoing the step, S_{t-1} = (S_t - v_t k_t^T - sa_t b_t^T) diag(1/d_t),
// restarting every CHUNK steps from a checkpoint of the forward; dividing by d is well conditioned for
// the model's decays (d >= exp(-exp(-0.5)) = 0.545: at most 0.545^-15 ~ 1e4 growth of rounding within
// a chunk, typically far less), not for decays near zero.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define WKV7_HD __host__ __device__ __forceinline__
#define WKV7_PRAGMA(...) _Pragma(#__VA_ARGS__)
// Fully unrolled: the row arrays are indexed by constants only, so they stay in registers.
#define WKV7_LOOP(...) WKV7_PRAGMA(unroll)
#elif defined(__GNUC__)
// Always inlined, so a caller compiled for a wider instruction set (see wkv7_cpu.cpp) vectorises them.
#define WKV7_HD inline __attribute__((always_inline))
#define WKV7_PRAGMA(...) _Pragma(#__VA_ARGS__)
#if defined(WKV_OMP_SIMD)
// On the host the j loops are vector loops (reductions may be reassociated); the CPU twin is built
// with -fopenmp-simd -DWKV_OMP_SIMD (train.wkv.CPU_CFLAGS).
#define WKV7_LOOP(...) WKV7_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#else
#define WKV7_LOOP(...)
#endif
#else
#define WKV7_HD inline
#define WKV7_LOOP(...)
#endif

namespace wkv7_math {

// Steps between two state checkpoints of the forward (the backward's restart points).
constexpr int CHUNK = 16;

typedef long long index_t;

WKV7_HD float wexp(float x) { return expf(x); }
WKV7_HD double wexp(double x) { return exp(x); }

// The decay factor d = exp(-exp(w)) and, for the backward, dd/dw = -d exp(w).
template <typename F>
WKV7_HD F decay(F w) { return wexp(-wexp(w)); }
template <typename F>
WKV7_HD F ddecay_dw(F w) { return -wexp(w) * wexp(-wexp(w)); }

// Slot of the checkpoint written after step t, or -1: after every CHUNK-th step and after the last one,
// so that the backward, walking t down from T-1, (re)starts from S_t at each of those t.
WKV7_HD int checkpoint_slot(int t, int T) { return ((t + 1) % CHUNK == 0 || t == T - 1) ? t / CHUNK : -1; }
WKV7_HD int checkpoint_count(int T) { return (T + CHUNK - 1) / CHUNK; }

// Forward step for row i. s: row i of S_{t-1} in, of S_t out. r, d, k, a, b: the step's vectors;
// v_i: this row's value. Returns y_i and sets sa_i (kept for the backward).
template <int N, typename F>
WKV7_HD F forward_row(F *s, const F *r, const F *d, const F *k, const F *a, const F *b, F v_i, F &sa_i) {
    F sa = 0;
    WKV7_LOOP(sa)
    for (int j = 0; j < N; j++) sa += s[j] * a[j];
    F y = 0;
    WKV7_LOOP(y)
    for (int j = 0; j < N; j++) {
        s[j] = s[j] * d[j] + sa * b[j] + v_i * k[j];
        y += s[j] * r[j];
    }
    sa_i = sa;
    return y;
}

// Gradients of one step for row worker i (dL/dw from dL/dd is the caller's: it needs w).
template <typename F>
struct RowGrads {
    F r, d, k, v, b, sa;  // sa: dL/d(sa_i) = (G b)_i, shared with the other rows before backward_row_b
};

// Backward, first half of step t for worker i.
//   st: column i of S_t in, of S_{t-1} out;  g, gt: row i and column i of G (adjoint of S_t, before
//   this step's y is added in); r..sa, gy: the step's shared vectors; *_i: this worker's entries.
template <int N, typename F>
WKV7_HD RowGrads<F> backward_row_a(F *st, F *g, F *gt, const F *r, const F *k, const F *v, const F *b,
                                   const F *sa, const F *gy, F r_i, F d_i, F k_i, F b_i, F gy_i) {
    const F inv_d = F(1) / d_i;
    F gr = 0, gd = 0, gk = 0, gv = 0, gb = 0, gsa = 0;
    WKV7_LOOP(gr, gd, gk, gv, gb, gsa)
    for (int j = 0; j < N; j++) {
        gr += st[j] * gy[j];                                  // (S_t^T gy)_i
        st[j] = (st[j] - v[j] * k_i - sa[j] * b_i) * inv_d;  // S_{t-1}[j, i]
        g[j] += gy_i * r[j];                                  // G += gy r^T, row i
        gt[j] += gy[j] * r_i;                                 //              column i
        gd += gt[j] * st[j];
        gk += gt[j] * v[j];
        gb += gt[j] * sa[j];
        gv += g[j] * k[j];
        gsa += g[j] * b[j];
    }
    return RowGrads<F>{gr, gd, gk, gv, gb, gsa};
}

// Backward, second half of step t for worker i, once every worker's gsa is in the shared vector:
// returns dL/da_i and moves G back across the step (G diag(d) + gsa a^T), row i and column i.
template <int N, typename F>
WKV7_HD F backward_row_b(const F *st, F *g, F *gt, const F *d, const F *a, const F *gsa, F d_i, F a_i,
                         F gsa_i) {
    F ga = 0;
    WKV7_LOOP(ga)
    for (int j = 0; j < N; j++) {
        ga += st[j] * gsa[j];
        g[j] = g[j] * d[j] + gsa_i * a[j];
        gt[j] = gt[j] * d_i + gsa[j] * a_i;
    }
    return ga;
}

}  // namespace wkv7_math
