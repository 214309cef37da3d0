// CPU twin of the WKV-6 CUDA kernels (wkv6_cuda.cu): the same workers of wkv6_math.h, run on the host.
// One task per (batch, head), parallel with at::parallel_for (OpenMP); inside a task the 64 workers run one
// after the other, each on its rows of small task-local matrices (what the CUDA threads keep in registers
// and shared memory), with the same checkpoint layout; the recomputed states of a chunk go to the same
// caller-allocated scratch (rows here, [tt][c][j]; the CUDA kernel stores them transposed). The header's
// loops are vector loops here.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>

#include "wkv6_math.h"

namespace {

constexpr int N = 64;  // the head size (as the CUDA kernels)
using wkv6_math::CHUNK;

// Runtime dispatch to the widest vector unit present (AVX-512, AVX2, else baseline x86-64), so one cached
// build is both fast and safe on any host (as wkv4_cpu.cpp).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define WKV6_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define WKV6_CPU_CLONES
#endif

// Pointers of one call: inputs and their gradients (B, T, H, N) of IO; u, state-like and scratch of F.
template <typename F, typename IO>
struct Args {
    int64_t B, T, H;
    const IO *r, *w, *k, *v, *gy;
    IO *y, *gr, *gw, *gk, *gv;
    const F *u, *s0, *gs_out;
    F *s_out, *gs_in, *ckpt, *scratch, *gu;
};

template <typename F, typename IO>
WKV6_HD void forward_head(const Args<F, IO> &p, int64_t bh) {
    const int64_t bb = bh / p.H, hh = bh % p.H;
    alignas(64) F s[N][N];  // s[j][i] = S[i, j]: worker j's column
    alignas(64) F r[N], u[N], k[N], d[N], v[N];
    for (int i = 0; i < N; i++) {
        u[i] = p.u[hh * N + i];
        for (int j = 0; j < N; j++) s[j][i] = p.s0[(bh * N + i) * N + j];
    }
    const int64_t ckpt_base = bh * wkv6_math::checkpoint_count(p.T) * N * N;
    for (int t = 0; t < p.T; t++) {
        if (t % CHUNK == 0) {
            F *c = p.ckpt + ckpt_base + (int64_t)(t / CHUNK) * N * N;
            for (int i = 0; i < N; i++)
                for (int j = 0; j < N; j++) c[i * N + j] = s[j][i];
        }
        const int64_t o = ((bb * p.T + t) * p.H + hh) * N;
        for (int j = 0; j < N; j++) {
            r[j] = static_cast<F>(p.r[o + j]);
            k[j] = static_cast<F>(p.k[o + j]);
            d[j] = wkv6_math::decay(static_cast<F>(p.w[o + j]));
            v[j] = static_cast<F>(p.v[o + j]);
        }
        for (int j = 0; j < N; j++) p.y[o + j] = static_cast<IO>(wkv6_math::forward_col<N, F>(s[j], r, u, k, d, v[j]));
    }
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) p.s_out[(bh * N + i) * N + j] = s[j][i];
}

template <typename F, typename IO>
WKV6_HD void backward_head(const Args<F, IO> &p, int64_t bh) {
    const int64_t bb = bh / p.H, hh = bh % p.H;
    // Row c of g / gt / s: worker c's row of G, column of G, row of the recomputed S.
    alignas(64) F g[N][N], gt[N][N], s[N][N];
    alignas(64) F r[N], u[N], w[N], k[N], d[N], v[N], gy[N], gu[N];
    F *buf = p.scratch + bh * CHUNK * N * N;  // [tt][c][j]: row c of S_{t-1}, t = chunk start + tt
    for (int i = 0; i < N; i++) {
        u[i] = p.u[hh * N + i];
        gu[i] = 0;
        for (int j = 0; j < N; j++) {
            g[i][j] = p.gs_out[(bh * N + i) * N + j];
            gt[i][j] = p.gs_out[(bh * N + j) * N + i];
        }
    }
    const int n_ckpt = wkv6_math::checkpoint_count((int)p.T);
    const int64_t ckpt_base = bh * n_ckpt * N * N;
    for (int chunk = n_ckpt - 1; chunk >= 0; chunk--) {
        const int t0 = chunk * CHUNK, t1 = std::min<int>((int)p.T, t0 + CHUNK);
        const F *c = p.ckpt + ckpt_base + (int64_t)chunk * N * N;
        for (int i = 0; i < N; i++)
            for (int j = 0; j < N; j++) s[i][j] = c[i * N + j];
        for (int t = t0; t < t1; t++) {  // recompute S_{t-1} for every step of the chunk
            const int64_t o = ((bb * p.T + t) * p.H + hh) * N;
            for (int j = 0; j < N; j++) {
                k[j] = static_cast<F>(p.k[o + j]);
                d[j] = wkv6_math::decay(static_cast<F>(p.w[o + j]));
                v[j] = static_cast<F>(p.v[o + j]);
            }
            for (int i = 0; i < N; i++) {
                std::copy(s[i], s[i] + N, buf + ((int64_t)(t - t0) * N + i) * N);
                wkv6_math::advance_row<N, F>(s[i], v, d[i], k[i]);
            }
        }
        for (int t = t1 - 1; t >= t0; t--) {
            const int64_t o = ((bb * p.T + t) * p.H + hh) * N;
            for (int j = 0; j < N; j++) {
                r[j] = static_cast<F>(p.r[o + j]);
                w[j] = static_cast<F>(p.w[o + j]);
                k[j] = static_cast<F>(p.k[o + j]);
                d[j] = wkv6_math::decay(w[j]);
                v[j] = static_cast<F>(p.v[o + j]);
                gy[j] = static_cast<F>(p.gy[o + j]);
            }
            for (int i = 0; i < N; i++) {
                const wkv6_math::RowGrads<F> gr = wkv6_math::backward_row<N, 1, F>(
                    buf + ((int64_t)(t - t0) * N + i) * N, g[i], gt[i], r, u, k, v, d, gy, r[i], u[i], k[i], d[i],
                    gy[i]);
                p.gr[o + i] = static_cast<IO>(gr.r);
                p.gw[o + i] = static_cast<IO>(gr.d * wkv6_math::ddecay_dw(w[i]));
                p.gk[o + i] = static_cast<IO>(gr.k);
                p.gv[o + i] = static_cast<IO>(gr.v);
                gu[i] += gr.u;
            }
        }
    }
    for (int i = 0; i < N; i++) {
        p.gu[bh * N + i] = gu[i];
        for (int j = 0; j < N; j++) p.gs_in[(bh * N + i) * N + j] = g[i][j];
    }
}

#define WKV6_CPU_RANGES(NAME, F, IO)                                                                  \
    WKV6_CPU_CLONES void forward_##NAME(const Args<F, IO> &p, int64_t begin, int64_t end) {           \
        for (int64_t bh = begin; bh < end; bh++) forward_head<F, IO>(p, bh);                          \
    }                                                                                                 \
    WKV6_CPU_CLONES void backward_##NAME(const Args<F, IO> &p, int64_t begin, int64_t end) {          \
        for (int64_t bh = begin; bh < end; bh++) backward_head<F, IO>(p, bh);                         \
    }                                                                                                 \
    void run(const Args<F, IO> &p, bool fwd) {                                                        \
        at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {                           \
            fwd ? forward_##NAME(p, begin, end) : backward_##NAME(p, begin, end);                     \
        });                                                                                           \
    }

WKV6_CPU_RANGES(f32, float, float)
WKV6_CPU_RANGES(f64, double, double)
WKV6_CPU_RANGES(bf16, float, at::BFloat16)

void check_io(const torch::Tensor &x, const char *name, const torch::Tensor &r) {
    TORCH_CHECK(x.device().is_cpu(), "wkv6_cpu: ", name, " must be a CPU tensor");
    TORCH_CHECK(x.sizes() == r.sizes(), "wkv6_cpu: ", name, " must have shape ", r.sizes(), ", got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == r.scalar_type(), "wkv6_cpu: ", name, " must be ", r.scalar_type(), ", got ",
                x.scalar_type());
    TORCH_CHECK(x.is_contiguous(), "wkv6_cpu: ", name, " must be contiguous");
}

void check_f(const torch::Tensor &x, const char *name, at::ScalarType f, at::IntArrayRef shape) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "wkv6_cpu: ", name, " must be a contiguous CPU tensor");
    TORCH_CHECK(x.scalar_type() == f, "wkv6_cpu: ", name, " must be ", f, ", got ", x.scalar_type());
    TORCH_CHECK(x.sizes() == shape, "wkv6_cpu: ", name, " must have shape ", shape, ", got ", x.sizes());
}

at::ScalarType compute_type(const torch::Tensor &r) {
    TORCH_CHECK(r.scalar_type() == at::kFloat || r.scalar_type() == at::kBFloat16 || r.scalar_type() == at::kDouble,
                "wkv6_cpu: inputs must be float32, bfloat16 or float64, got ", r.scalar_type());
    TORCH_CHECK(r.dim() == 4 && r.size(3) == N, "wkv6_cpu: r must be (B, T, H, ", N, "), got ", r.sizes());
    TORCH_CHECK(r.size(1) <= INT32_MAX, "wkv6_cpu: T = ", r.size(1), " is too large");
    return r.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks r, w, k, v, u and the checkpoints; returns the compute type.
at::ScalarType check_common(const torch::Tensor &r, const torch::Tensor &w, const torch::Tensor &k,
                            const torch::Tensor &v, const torch::Tensor &u, const torch::Tensor &ckpt) {
    const auto f = compute_type(r);
    check_io(w, "w", r), check_io(k, "k", r), check_io(v, "v", r);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
    check_f(u, "u", f, {H, N});
    check_f(ckpt, "ckpt", f, {B, H, (T + CHUNK - 1) / CHUNK, N, N});
    return f;
}

template <typename F, typename IO>
Args<F, IO> inputs(const torch::Tensor &r, const torch::Tensor &w, const torch::Tensor &k, const torch::Tensor &v,
                   const torch::Tensor &u, const torch::Tensor &ckpt) {
    Args<F, IO> p{};
    p.B = r.size(0), p.T = r.size(1), p.H = r.size(2);
    p.r = r.data_ptr<IO>(), p.w = w.data_ptr<IO>(), p.k = k.data_ptr<IO>(), p.v = v.data_ptr<IO>();
    p.u = u.data_ptr<F>(), p.ckpt = ckpt.data_ptr<F>();
    return p;
}

template <typename F, typename IO>
void forward_impl(const torch::Tensor &r, const torch::Tensor &w, const torch::Tensor &k, const torch::Tensor &v,
                  const torch::Tensor &u, const torch::Tensor &s0, torch::Tensor &y, torch::Tensor &s_out,
                  torch::Tensor &ckpt) {
    auto p = inputs<F, IO>(r, w, k, v, u, ckpt);
    p.s0 = s0.data_ptr<F>(), p.y = y.data_ptr<IO>(), p.s_out = s_out.data_ptr<F>();
    run(p, true);
}

template <typename F, typename IO>
void backward_impl(const torch::Tensor &r, const torch::Tensor &w, const torch::Tensor &k, const torch::Tensor &v,
                   const torch::Tensor &u, const torch::Tensor &gy, const torch::Tensor &ckpt,
                   const torch::Tensor &gs_out, torch::Tensor &scratch, torch::Tensor &gs_in, torch::Tensor &gr,
                   torch::Tensor &gw, torch::Tensor &gk, torch::Tensor &gv, torch::Tensor &gu) {
    auto p = inputs<F, IO>(r, w, k, v, u, ckpt);
    p.gy = gy.data_ptr<IO>(), p.gs_out = gs_out.data_ptr<F>(), p.gs_in = gs_in.data_ptr<F>();
    p.scratch = scratch.data_ptr<F>();
    p.gr = gr.data_ptr<IO>(), p.gw = gw.data_ptr<IO>(), p.gk = gk.data_ptr<IO>(), p.gv = gv.data_ptr<IO>();
    p.gu = gu.data_ptr<F>();
    run(p, false);
}

// Writes y, s_out (final state) and ckpt (B, H, ceil(T/16), N, N), starting from s0.
void forward(const torch::Tensor &r, const torch::Tensor &w, const torch::Tensor &k, const torch::Tensor &v,
             const torch::Tensor &u, const torch::Tensor &s0, torch::Tensor y, torch::Tensor s_out,
             torch::Tensor ckpt) {
    const auto f = check_common(r, w, k, v, u, ckpt);
    check_io(y, "y", r);
    const int64_t B = r.size(0), H = r.size(2);
    check_f(s0, "s0", f, {B, H, N, N});
    check_f(s_out, "s_out", f, {B, H, N, N});
    if (r.scalar_type() == at::kFloat)
        forward_impl<float, float>(r, w, k, v, u, s0, y, s_out, ckpt);
    else if (r.scalar_type() == at::kDouble)
        forward_impl<double, double>(r, w, k, v, u, s0, y, s_out, ckpt);
    else
        forward_impl<float, at::BFloat16>(r, w, k, v, u, s0, y, s_out, ckpt);
}

// From gy and gs_out (dL/d final state) writes gs_in (dL/d initial state), gr, gw, gk, gv and gu
// (B, H, N: dL/du per batch, summed over time); scratch (B, H, 16, N, N) holds a chunk's recomputed states.
void backward(const torch::Tensor &r, const torch::Tensor &w, const torch::Tensor &k, const torch::Tensor &v,
              const torch::Tensor &u, const torch::Tensor &gy, const torch::Tensor &ckpt,
              const torch::Tensor &gs_out, torch::Tensor scratch, torch::Tensor gs_in, torch::Tensor gr,
              torch::Tensor gw, torch::Tensor gk, torch::Tensor gv, torch::Tensor gu) {
    const auto f = check_common(r, w, k, v, u, ckpt);
    check_io(gy, "gy", r), check_io(gr, "gr", r), check_io(gw, "gw", r), check_io(gk, "gk", r);
    check_io(gv, "gv", r);
    const int64_t B = r.size(0), H = r.size(2);
    check_f(gs_out, "gs_out", f, {B, H, N, N});
    check_f(gs_in, "gs_in", f, {B, H, N, N});
    check_f(scratch, "scratch", f, {B, H, CHUNK, N, N});
    check_f(gu, "gu", f, {B, H, N});
    if (r.scalar_type() == at::kFloat)
        backward_impl<float, float>(r, w, k, v, u, gy, ckpt, gs_out, scratch, gs_in, gr, gw, gk, gv, gu);
    else if (r.scalar_type() == at::kDouble)
        backward_impl<double, double>(r, w, k, v, u, gy, ckpt, gs_out, scratch, gs_in, gr, gw, gk, gv, gu);
    else
        backward_impl<float, at::BFloat16>(r, w, k, v, u, gy, ckpt, gs_out, scratch, gs_in, gr, gw, gk, gv, gu);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "WKV-6 forward on CPU (in place: y, s_out, ckpt)");
    m.def("backward", &backward, "WKV-6 backward on CPU (in place: scratch, gs_in, gr, gw, gk, gv, gu)");
}
