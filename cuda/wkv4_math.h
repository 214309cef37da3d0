// WKV (RWKV-4 time mixing) forward and backward, written once for nvcc and for the host compiler.
//
// The math is RWKV-LM v4neo's kernel (RWKV-v4neo/cuda/wkv4_cuda.cu and wkv_cuda_bf16.cu): per channel,
// with w = -exp(time_decay) and u = time_first,
//     y_t = (A_t + e^{u+k_t} v_t) / (B_t + e^{u+k_t}),  A_{t+1} = e^w A_t + e^{k_t} v_t,  B likewise with v = 1,
// where A = aa * e^pp and B = bb * e^pp are kept scaled by a running maximum exponent pp, so nothing
// overflows for large |k|. I/O may be bf16 or fp16; all arithmetic is in F (float, or double for gradcheck).
//
// Two additions to RWKV-LM, so that a sequence can run in chunks (bounded scratch memory, unlimited
// context, stateful inference):
//  - the forward starts from a carried state (aa, bb, pp) and leaves the final one behind;
//  - the backward takes the adjoint of the final state (in the same scaled form: dL/dA = sa * e^sp) and
//    returns the adjoint of the initial state, adding the final state's share to the w gradient.
//
// Functions work on N adjacent channels of one batch row ("lanes"): CUDA runs N = 1 per thread, the CPU
// extension runs a block of N channels per task so the compiler can vectorise the inner lane loops.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define WKV_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined, so a caller compiled for a wider instruction set (see wkv4_cpu.cpp) vectorises them.
#define WKV_HD inline __attribute__((always_inline))
#else
#define WKV_HD inline
#endif

// Lane loops are independent across channels; ask the host compiler to vectorise them.
#if !defined(__CUDACC__) && defined(WKV_OMP_SIMD)
#define WKV_LANES _Pragma("omp simd")
#elif !defined(__CUDACC__) && defined(__GNUC__) && !defined(__clang__)
#define WKV_LANES _Pragma("GCC ivdep")
#else
#define WKV_LANES
#endif

namespace wkv_math {

// Stands in for log(0); finite so that differences of exponents stay finite.
#define WKV_MIN_EXP (-1e38)

typedef long long index_t;

WKV_HD float wexp(float x) { return expf(x); }
WKV_HD double wexp(double x) { return exp(x); }
template <typename F>
WKV_HD F wmax(F a, F b) { return a > b ? a : b; }

template <typename F, typename IO>
WKV_HD F load(const IO *p) { return static_cast<F>(*p); }
template <typename F, typename IO>
WKV_HD void store(IO *p, F x) { *p = static_cast<IO>(x); }

// Forward over T steps for N channels.
//   w, u: N values (w already -exp(time_decay)); k, v, y: element (t, j) at [t * C + j];
//   state: in/out, aa at [j], bb at [sstride + j], pp at [2 * sstride + j].
template <int N, typename F, typename IO>
WKV_HD void forward_lanes(int T, int C, const F *w, const F *u, const IO *k, const IO *v, IO *y, F *state,
                          index_t sstride) {
    F aa[N], bb[N], pp[N];
    for (int j = 0; j < N; j++) {
        aa[j] = state[j];
        bb[j] = state[sstride + j];
        pp[j] = state[2 * sstride + j];
    }
    for (int t = 0; t < T; t++) {
        const index_t o = (index_t)t * C;
        WKV_LANES
        for (int j = 0; j < N; j++) {
            const F kk = load<F>(k + o + j);
            const F vv = load<F>(v + o + j);
            F ww = u[j] + kk;
            F p = wmax(pp[j], ww);
            F e1 = wexp(pp[j] - p);
            F e2 = wexp(ww - p);
            store<F>(y + o + j, (e1 * aa[j] + e2 * vv) / (e1 * bb[j] + e2));

            ww = w[j] + pp[j];
            p = wmax(ww, kk);
            e1 = wexp(ww - p);
            e2 = wexp(kk - p);
            aa[j] = e1 * aa[j] + e2 * vv;
            bb[j] = e1 * bb[j] + e2;
            pp[j] = p;
        }
    }
    for (int j = 0; j < N; j++) {
        state[j] = aa[j];
        state[sstride + j] = bb[j];
        state[2 * sstride + j] = pp[j];
    }
}

// Backward over T steps for N channels.
//   y: the forward's output; gy: dL/dy; state: the forward state at the start of these T steps;
//   gstate: in = adjoint of the state after the last step (sa, sb, sp; zeros and WKV_MIN_EXP if none),
//           out = adjoint of the state before the first step, same layout as state;
//   gw, gu: N values out, this batch row's dL/dtime_decay (chain rule through w = -exp(time_decay)
//           applied, as RWKV-LM does) and dL/du; gk, gv: out, like k;
//   q, r: scratch for the per-step 1/denominator and exponent (RWKV-LM's q[], r[]), element (t, j) at
//         [t * qs + j]: the CPU passes a task-local buffer (qs = N), CUDA a slice of a global (B, T, C)
//         buffer from PyTorch's allocator (qs = C, coalesced across threads). Never a per-thread stack
//         array: the driver would reserve it for every resident thread, outside PyTorch's accounting.
template <int N, typename F, typename IO>
WKV_HD void backward_lanes(int T, int C, const F *w, const F *u, const IO *k, const IO *v, const IO *y,
                           const IO *gy, const F *state, F *gstate, index_t sstride, F *gw, F *gu, IO *gk,
                           IO *gv, F *q, F *r, index_t qs) {
    F aa[N], bb[N], pp[N], ga[N], gb[N], sgw[N], sgu[N];
    for (int j = 0; j < N; j++) {
        aa[j] = state[j];
        bb[j] = state[sstride + j];
        pp[j] = state[2 * sstride + j];
        ga[j] = 0;  // d(aa)/dw and d(bb)/dw, scaled like aa and bb
        gb[j] = 0;
        sgw[j] = 0;
        sgu[j] = 0;
    }
    for (int t = 0; t < T; t++) {
        const index_t o = (index_t)t * C;
        WKV_LANES
        for (int j = 0; j < N; j++) {
            const F kk = load<F>(k + o + j);
            const F vv = load<F>(v + o + j);
            const F yy = load<F>(y + o + j);
            F ww = u[j] + kk;
            F p = wmax(pp[j], ww);
            F e1 = wexp(pp[j] - p);
            F e2 = wexp(ww - p);
            const F qq = load<F>(gy + o + j) / (e1 * bb[j] + e2);
            sgw[j] += (ga[j] - gb[j] * yy) * e1 * qq;
            sgu[j] += (vv - yy) * e2 * qq;
            q[t * qs + j] = qq;
            r[t * qs + j] = ww - p;

            ww = w[j] + pp[j];
            p = wmax(ww, kk);
            e1 = wexp(ww - p);
            e2 = wexp(kk - p);
            ga[j] = e1 * (aa[j] + ga[j]);
            gb[j] = e1 * (bb[j] + gb[j]);
            aa[j] = e1 * aa[j] + e2 * vv;
            bb[j] = e1 * bb[j] + e2;
            pp[j] = p;
        }
    }
    // The carried-out state also depends on w: dL/dw += dL/dA_T * dA_T/dw + dL/dB_T * dB_T/dw.
    // Then the reverse sweep starts from that adjoint (zero when nothing follows).
    for (int j = 0; j < N; j++) {
        const F sa = gstate[j], sb = gstate[sstride + j], sp = gstate[2 * sstride + j];
        sgw[j] += wexp(pp[j] + sp) * (sa * ga[j] + sb * gb[j]);
        gw[j] = sgw[j] * w[j];  // d(-exp(d))/dd = w
        gu[j] = sgu[j];
        aa[j] = sa;
        bb[j] = sb;
        pp[j] = sp;
    }
    for (int t = T - 1; t >= 0; t--) {
        const index_t o = (index_t)t * C;
        WKV_LANES
        for (int j = 0; j < N; j++) {
            const F kk = load<F>(k + o + j);
            const F vv = load<F>(v + o + j);
            const F yy = load<F>(y + o + j);
            const F qq = q[t * qs + j];
            const F rr = r[t * qs + j];

            F e1 = qq * wexp(rr);
            F e2 = wexp(kk + pp[j]);
            store<F>(gk + o + j, e1 * (vv - yy) + e2 * (aa[j] * vv + bb[j]));
            store<F>(gv + o + j, e1 + e2 * aa[j]);

            const F ww = w[j] + pp[j];
            const F www = rr - u[j] - kk;
            const F p = wmax(ww, www);
            e1 = wexp(ww - p);
            e2 = qq * wexp(www - p);
            aa[j] = e1 * aa[j] + e2;
            bb[j] = e1 * bb[j] - e2 * yy;
            pp[j] = p;
        }
    }
    for (int j = 0; j < N; j++) {
        gstate[j] = aa[j];
        gstate[sstride + j] = bb[j];
        gstate[2 * sstride + j] = pp[j];
    }
}

}  // namespace wkv_math
