// WKV-6 (RWKV-6 "x060", RWKV-5 "x052") per-step math, written once for nvcc and for the host compiler.
//
// Per batch and head, state S (N x N, [key i, value j]), with d_t = exp(-exp(w_t)) and bonus u:
//     y_t[j] = sum_i r_t[i] (u[i] k_t[i] v_t[j] + S_{t-1}[i,j]),     S_t = diag(d_t) S_{t-1} + k_t v_t^T
//
// Forward: one "column worker" per value index j owns column j of S, so y_j is a sum inside one worker
// (as RWKV-LM's v6 kernel). Backward: one "row worker" per key index c owns row c of S_{t-1}, row c and
// column c of the adjoint G = dL/dS_t, so every sum the gradients need is a sum inside one worker. CUDA
// runs one worker per thread; the CPU twin (wkv6_cpu.cpp) runs the 64 workers of a head one after the
// other. Both call exactly these functions. The per-step vectors (r, u, k, v, d, gy) are what all
// workers of a head share: CUDA's shared memory, a small local buffer on the host.
//
// Backward, per step t from T-1 down to 0, with G the adjoint of S_t (dL/dS_T given: chained segments):
//     gr_t = S_{t-1} gy_t + (u . k_t) (gy_t . v_t),   gk_t = G v_t + (r_t . u) (gy_t . v_t),
//     gv_t = G^T k_t + gy_t (r_t . u . k_t),   gd_t[c] = sum_j G[c,j] S_{t-1}[c,j],   gu += r_t k_t (gy_t . v_t),
//     G <- diag(d_t) G + r_t gy_t^T                                              (the adjoint of S_{t-1})
// S_{t-1} is never rebuilt by dividing by d (RWKV-6's decays reach 0): the forward stores S before every
// CHUNK-th step, and the backward recomputes the states of a chunk forward from that checkpoint
// (advance_row), keeping them in scratch, then walks the chunk down. Exact for any decay in [0, 1].
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define WKV6_HD __host__ __device__ __forceinline__
#define WKV6_PRAGMA(...) _Pragma(#__VA_ARGS__)
// Fully unrolled: register arrays are indexed by constants only, so they stay in registers.
#define WKV6_LOOP(...) WKV6_PRAGMA(unroll)
#define WKV6_VEC WKV6_PRAGMA(unroll)
#elif defined(__GNUC__)
// Always inlined, so a caller compiled for a wider instruction set (see wkv6_cpu.cpp) vectorises them.
#define WKV6_HD inline __attribute__((always_inline))
#define WKV6_PRAGMA(...) _Pragma(#__VA_ARGS__)
#if defined(WKV_OMP_SIMD)
// On the host the loops are vector loops (reductions may be reassociated); the CPU twin is built with
// -fopenmp-simd -DWKV_OMP_SIMD (train.wkv.CPU_CFLAGS).
#define WKV6_LOOP(...) WKV6_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#define WKV6_VEC WKV6_PRAGMA(omp simd)
#else
#define WKV6_LOOP(...)
#define WKV6_VEC
#endif
#else
#define WKV6_HD inline
#define WKV6_LOOP(...)
#define WKV6_VEC
#endif

namespace wkv6_math {

// Steps between two state checkpoints of the forward (the backward's restart points).
constexpr int CHUNK = 16;

typedef long long index_t;

WKV6_HD float wexp(float x) { return expf(x); }
WKV6_HD double wexp(double x) { return exp(x); }

// The decay factor d = exp(-exp(w)) and, for the backward, dd/dw = -exp(w - exp(w)) (one exponential of
// a finite argument: -exp(w) * exp(-exp(w)) would be inf * 0 = NaN for w > ~88 in fp32).
template <typename F>
WKV6_HD F decay(F w) { return wexp(-wexp(w)); }
template <typename F>
WKV6_HD F ddecay_dw(F w) { return -wexp(w - wexp(w)); }

// Checkpoint slot c holds S_{16c - 1}, the state before step 16c (slot 0: the initial state).
WKV6_HD int checkpoint_count(int T) { return (T + CHUNK - 1) / CHUNK; }

// Forward step for column worker j. s: column j of S_{t-1} in (s[i] = S[i,j]), of S_t out;
// r, u, k, d: the step's vectors; v_j: this column's value. Returns y_j.
template <int N, typename F>
WKV6_HD F forward_col(F *s, const F *r, const F *u, const F *k, const F *d, F v_j) {
    F y = 0;
    WKV6_LOOP(y)
    for (int i = 0; i < N; i++) {
        y += r[i] * (u[i] * k[i] * v_j + s[i]);
        s[i] = d[i] * s[i] + k[i] * v_j;
    }
    return y;
}

// The backward's recomputation, row worker c: row c of S_{t-1} in, of S_t out.
template <int N, typename F>
WKV6_HD void advance_row(F *s, const F *v, F d_c, F k_c) {
    WKV6_VEC
    for (int j = 0; j < N; j++) s[j] = d_c * s[j] + k_c * v[j];
}

// Gradients of one step for row worker c (dL/dw from dL/dd is the caller's: it needs w).
template <typename F>
struct RowGrads {
    F r, d, k, v, u;
};

// Backward step t for row worker c.
//   sp: row c of S_{t-1}, element j at sp[j * SP] (SP: its stride in the caller's scratch);
//   g, gt: row c and column c of G (adjoint of S_t in, of S_{t-1} out);
//   r, u, k, v, d, gy: the step's shared vectors; *_c: this worker's entries.
template <int N, int SP, typename F>
WKV6_HD RowGrads<F> backward_row(const F *sp, F *g, F *gt, const F *r, const F *u, const F *k, const F *v,
                                 const F *d, const F *gy, F r_c, F u_c, F k_c, F d_c, F gy_c) {
    F gr = 0, gd = 0, gk = 0, gv = 0, gyv = 0, ruk = 0;
    WKV6_LOOP(gr, gd, gk, gv, gyv, ruk)
    for (int j = 0; j < N; j++) {
        const F s = sp[j * SP];
        gr += gy[j] * s;          // (S_{t-1} gy)_c
        gd += g[j] * s;           // sum_j G[c,j] S_{t-1}[c,j]
        gk += g[j] * v[j];        // (G v)_c
        gv += gt[j] * k[j];       // (G^T k)_c
        gyv += gy[j] * v[j];      // gy . v       (every worker computes these two itself:
        ruk += r[j] * u[j] * k[j];  // r . u . k    no exchange between workers)
        g[j] = d_c * g[j] + r_c * gy[j];   // G <- diag(d) G + r gy^T: row c
        gt[j] = d[j] * gt[j] + r[j] * gy_c;  //                        column c
    }
    return RowGrads<F>{gr + u_c * k_c * gyv, gd, gk + r_c * u_c * gyv, gv + gy_c * ruk, r_c * k_c * gyv};
}

}  // namespace wkv6_math
