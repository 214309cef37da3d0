// CPU twin of the WKV-7 CUDA kernels (wkv7_cuda.cu): the same row workers of wkv7_math.h, run on the host.
// One task per (batch, head), parallel with at::parallel_for (OpenMP); inside a task the 64 row workers
// run one after the other, each on its rows of small task-local matrices (what the CUDA threads keep in
// registers and shared memory), with the same checkpoint and sa scratch in the same layouts. The header's
// j loops are vector loops here.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "wkv7_math.h"

namespace {

constexpr int N = 64;  // the head size (as the CUDA kernels)
using wkv7_math::CHUNK;

// Runtime dispatch to the widest vector unit present (AVX-512, AVX2, else baseline x86-64), so one cached
// build is both fast and safe on any host (as wkv4_cpu.cpp).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define WKV7_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define WKV7_CPU_CLONES
#endif

// Pointers of one call: inputs and their gradients (B, T, H, N) of IO; state-like and scratch of F.
template <typename F, typename IO>
struct Args {
    int64_t B, T, H;
    const IO *r, *w, *k, *v, *a, *b, *gy;
    IO *y, *gr, *gw, *gk, *gv, *ga, *gb;
    const F *s0, *gs_out;
    F *s_out, *gs_in, *ckpt, *sa;
};

template <typename F, typename IO>
WKV7_HD void forward_head(const Args<F, IO> &p, int64_t bh) {
    const int64_t bb = bh / p.H, hh = bh % p.H;
    alignas(64) F s[N][N];
    alignas(64) F r[N], d[N], k[N], a[N], b[N], v[N];
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) s[i][j] = p.s0[(bh * N + i) * N + j];
    const int64_t ckpt_base = bh * wkv7_math::checkpoint_count(p.T) * N * N;
    for (int t = 0; t < p.T; t++) {
        const int64_t o = ((bb * p.T + t) * p.H + hh) * N;
        for (int j = 0; j < N; j++) {
            r[j] = static_cast<F>(p.r[o + j]);
            d[j] = wkv7_math::decay(static_cast<F>(p.w[o + j]));
            k[j] = static_cast<F>(p.k[o + j]);
            v[j] = static_cast<F>(p.v[o + j]);
            a[j] = static_cast<F>(p.a[o + j]);
            b[j] = static_cast<F>(p.b[o + j]);
        }
        for (int i = 0; i < N; i++) {
            F sa;
            const F y = wkv7_math::forward_row<N, F>(s[i], r, d, k, a, b, v[i], sa);
            p.y[o + i] = static_cast<IO>(y);
            p.sa[o + i] = sa;
        }
        const int slot = wkv7_math::checkpoint_slot(t, (int)p.T);
        if (slot >= 0) {
            F *c = p.ckpt + ckpt_base + (int64_t)slot * N * N;
            for (int j = 0; j < N; j++)
                for (int i = 0; i < N; i++) c[j * N + i] = s[i][j];  // transposed, as the CUDA kernel
        }
    }
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) p.s_out[(bh * N + i) * N + j] = s[i][j];
}

template <typename F, typename IO>
WKV7_HD void backward_head(const Args<F, IO> &p, int64_t bh) {
    const int64_t bb = bh / p.H, hh = bh % p.H;
    // Row i of st / g / gt: worker i's column of S, row of G, column of G.
    alignas(64) F st[N][N], g[N][N], gt[N][N];
    alignas(64) F r[N], w[N], d[N], k[N], v[N], a[N], b[N], gy[N], sa[N], gsa[N];
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) {
            g[i][j] = p.gs_out[(bh * N + i) * N + j];
            gt[i][j] = p.gs_out[(bh * N + j) * N + i];
        }
    const int64_t ckpt_base = bh * wkv7_math::checkpoint_count(p.T) * N * N;
    for (int t = (int)p.T - 1; t >= 0; t--) {
        const int64_t o = ((bb * p.T + t) * p.H + hh) * N;
        for (int j = 0; j < N; j++) {
            r[j] = static_cast<F>(p.r[o + j]);
            w[j] = static_cast<F>(p.w[o + j]);
            d[j] = wkv7_math::decay(w[j]);
            k[j] = static_cast<F>(p.k[o + j]);
            v[j] = static_cast<F>(p.v[o + j]);
            a[j] = static_cast<F>(p.a[o + j]);
            b[j] = static_cast<F>(p.b[o + j]);
            gy[j] = static_cast<F>(p.gy[o + j]);
            sa[j] = p.sa[o + j];
        }
        const int slot = wkv7_math::checkpoint_slot(t, (int)p.T);
        if (slot >= 0) {
            const F *c = p.ckpt + ckpt_base + (int64_t)slot * N * N;
            for (int i = 0; i < N; i++)
                for (int j = 0; j < N; j++) st[i][j] = c[i * N + j];
        }
        for (int i = 0; i < N; i++) {
            const wkv7_math::RowGrads<F> gr = wkv7_math::backward_row_a<N, F>(
                st[i], g[i], gt[i], r, k, v, b, sa, gy, r[i], d[i], k[i], b[i], gy[i]);
            p.gr[o + i] = static_cast<IO>(gr.r);
            p.gw[o + i] = static_cast<IO>(gr.d * wkv7_math::ddecay_dw(w[i]));
            p.gk[o + i] = static_cast<IO>(gr.k);
            p.gv[o + i] = static_cast<IO>(gr.v);
            p.gb[o + i] = static_cast<IO>(gr.b);
            gsa[i] = gr.sa;
        }
        for (int i = 0; i < N; i++)
            p.ga[o + i] = static_cast<IO>(
                wkv7_math::backward_row_b<N, F>(st[i], g[i], gt[i], d, a, gsa, d[i], a[i], gsa[i]));
    }
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) p.gs_in[(bh * N + i) * N + j] = g[i][j];
}

#define WKV7_CPU_RANGES(NAME, F, IO)                                                                  \
    WKV7_CPU_CLONES void forward_##NAME(const Args<F, IO> &p, int64_t begin, int64_t end) {           \
        for (int64_t bh = begin; bh < end; bh++) forward_head<F, IO>(p, bh);                          \
    }                                                                                                 \
    WKV7_CPU_CLONES void backward_##NAME(const Args<F, IO> &p, int64_t begin, int64_t end) {          \
        for (int64_t bh = begin; bh < end; bh++) backward_head<F, IO>(p, bh);                         \
    }                                                                                                 \
    void run(const Args<F, IO> &p, bool fwd) {                                                        \
        at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {                           \
            fwd ? forward_##NAME(p, begin, end) : backward_##NAME(p, begin, end);                     \
        });                                                                                           \
    }

WKV7_CPU_RANGES(f32, float, float)
WKV7_CPU_RANGES(f64, double, double)
WKV7_CPU_RANGES(bf16, float, at::BFloat16)

void check_io(const torch::Tensor &x, const char *name, const torch::Tensor &r) {
    TORCH_CHECK(x.device().is_cpu(), "wkv7_cpu: ", name, " must be a CPU tensor");
    TORCH_CHECK(x.sizes() == r.sizes(), "wkv7_cpu: ", name, " must have shape ", r.sizes(), ", got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == r.scalar_type(), "wkv7_cpu: ", name, " must be ", r.scalar_type(), ", got ",
                x.scalar_type());
    TORCH_CHECK(x.is_contiguous(), "wkv7_cpu: ", name, " must be contiguous");
}

void check_f(const torch::Tensor &x, const char *name, at::ScalarType f, at::IntArrayRef shape) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "wkv7_cpu: ", name, " must be a contiguous CPU tensor");
    TORCH_CHECK(x.scalar_type() == f, "wkv7_cpu: ", name, " must be ", f, ", got ", x.scalar_type());
    TORCH_CHECK(x.sizes() == shape, "wkv7_cpu: ", name, " must have shape ", shape, ", got ", x.sizes());
}

at::ScalarType compute_type(const torch::Tensor &r) {
    TORCH_CHECK(r.scalar_type() == at::kFloat || r.scalar_type() == at::kBFloat16 || r.scalar_type() == at::kDouble,
                "wkv7_cpu: inputs must be float32, bfloat16 or float64, got ", r.scalar_type());
    TORCH_CHECK(r.dim() == 4 && r.size(3) == N, "wkv7_cpu: r must be (B, T, H, ", N, "), got ", r.sizes());
    TORCH_CHECK(r.size(1) <= INT32_MAX, "wkv7_cpu: T = ", r.size(1), " is too large");
    return r.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_six(const torch::Tensor *xs[6], const char *const names[6], const torch::Tensor &r) {
    for (int n = 0; n < 6; n++) check_io(*xs[n], names[n], r);
}

template <typename F, typename IO>
Args<F, IO> inputs(const torch::Tensor &r, const torch::Tensor &w, const torch::Tensor &k, const torch::Tensor &v,
                   const torch::Tensor &a, const torch::Tensor &b, const torch::Tensor &ckpt,
                   const torch::Tensor &sa) {
    Args<F, IO> p{};
    p.B = r.size(0), p.T = r.size(1), p.H = r.size(2);
    p.r = r.data_ptr<IO>(), p.w = w.data_ptr<IO>(), p.k = k.data_ptr<IO>();
    p.v = v.data_ptr<IO>(), p.a = a.data_ptr<IO>(), p.b = b.data_ptr<IO>();
    p.ckpt = ckpt.data_ptr<F>(), p.sa = sa.data_ptr<F>();
    return p;
}

template <typename F, typename IO>
void forward_impl(const torch::Tensor &r, const torch::Tensor &w, const torch::Tensor &k, const torch::Tensor &v,
                  const torch::Tensor &a, const torch::Tensor &b, const torch::Tensor &s0, torch::Tensor &y,
                  torch::Tensor &s_out, torch::Tensor &ckpt, torch::Tensor &sa) {
    auto p = inputs<F, IO>(r, w, k, v, a, b, ckpt, sa);
    p.s0 = s0.data_ptr<F>(), p.y = y.data_ptr<IO>(), p.s_out = s_out.data_ptr<F>();
    run(p, true);
}

template <typename F, typename IO>
void backward_impl(const torch::Tensor &r, const torch::Tensor &w, const torch::Tensor &k, const torch::Tensor &v,
                   const torch::Tensor &a, const torch::Tensor &b, const torch::Tensor &gy, const torch::Tensor &ckpt,
                   const torch::Tensor &sa, const torch::Tensor &gs_out, torch::Tensor &gs_in, torch::Tensor &gr,
                   torch::Tensor &gw, torch::Tensor &gk, torch::Tensor &gv, torch::Tensor &ga, torch::Tensor &gb) {
    auto p = inputs<F, IO>(r, w, k, v, a, b, ckpt, sa);
    p.gy = gy.data_ptr<IO>(), p.gs_out = gs_out.data_ptr<F>(), p.gs_in = gs_in.data_ptr<F>();
    p.gr = gr.data_ptr<IO>(), p.gw = gw.data_ptr<IO>(), p.gk = gk.data_ptr<IO>();
    p.gv = gv.data_ptr<IO>(), p.ga = ga.data_ptr<IO>(), p.gb = gb.data_ptr<IO>();
    run(p, false);
}

const char *const kNames[6] = {"r", "w", "k", "v", "a", "b"};
const char *const kGradNames[6] = {"gr", "gw", "gk", "gv", "ga", "gb"};

// Writes y, s_out (final state), ckpt (B, H, ceil(T/16), N, N) and sa (B, T, H, N), starting from s0.
void forward(const torch::Tensor &r, const torch::Tensor &w, const torch::Tensor &k, const torch::Tensor &v,
             const torch::Tensor &a, const torch::Tensor &b, const torch::Tensor &s0, torch::Tensor y,
             torch::Tensor s_out, torch::Tensor ckpt, torch::Tensor sa) {
    const auto f = compute_type(r);
    const torch::Tensor *xs[6] = {&r, &w, &k, &v, &a, &b};
    check_six(xs, kNames, r);
    check_io(y, "y", r);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
    check_f(s0, "s0", f, {B, H, N, N});
    check_f(s_out, "s_out", f, {B, H, N, N});
    check_f(ckpt, "ckpt", f, {B, H, (T + CHUNK - 1) / CHUNK, N, N});
    check_f(sa, "sa", f, {B, T, H, N});
    if (r.scalar_type() == at::kFloat)
        forward_impl<float, float>(r, w, k, v, a, b, s0, y, s_out, ckpt, sa);
    else if (r.scalar_type() == at::kDouble)
        forward_impl<double, double>(r, w, k, v, a, b, s0, y, s_out, ckpt, sa);
    else
        forward_impl<float, at::BFloat16>(r, w, k, v, a, b, s0, y, s_out, ckpt, sa);
}

// From gy and gs_out (dL/d final state) writes gs_in (dL/d initial state) and the six input gradients.
void backward(const torch::Tensor &r, const torch::Tensor &w, const torch::Tensor &k, const torch::Tensor &v,
              const torch::Tensor &a, const torch::Tensor &b, const torch::Tensor &gy, const torch::Tensor &ckpt,
              const torch::Tensor &sa, const torch::Tensor &gs_out, torch::Tensor gs_in, torch::Tensor gr,
              torch::Tensor gw, torch::Tensor gk, torch::Tensor gv, torch::Tensor ga, torch::Tensor gb) {
    const auto f = compute_type(r);
    const torch::Tensor *xs[6] = {&r, &w, &k, &v, &a, &b};
    const torch::Tensor *gs[6] = {&gr, &gw, &gk, &gv, &ga, &gb};
    check_six(xs, kNames, r);
    check_six(gs, kGradNames, r);
    check_io(gy, "gy", r);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
    check_f(ckpt, "ckpt", f, {B, H, (T + CHUNK - 1) / CHUNK, N, N});
    check_f(sa, "sa", f, {B, T, H, N});
    check_f(gs_out, "gs_out", f, {B, H, N, N});
    check_f(gs_in, "gs_in", f, {B, H, N, N});
    if (r.scalar_type() == at::kFloat)
        backward_impl<float, float>(r, w, k, v, a, b, gy, ckpt, sa, gs_out, gs_in, gr, gw, gk, gv, ga, gb);
    else if (r.scalar_type() == at::kDouble)
        backward_impl<double, double>(r, w, k, v, a, b, gy, ckpt, sa, gs_out, gs_in, gr, gw, gk, gv, ga, gb);
    else
        backward_impl<float, at::BFloat16>(r, w, k, v, a, b, gy, ckpt, sa, gs_out, gs_in, gr, gw, gk, gv, ga, gb);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "WKV-7 forward on CPU (in place: y, s_out, ckpt, sa)");
    m.def("backward", &backward, "WKV-7 backward on CPU (in place: gs_in and the six input gradients)");
}
