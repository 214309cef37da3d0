// CPU twin of the WKV CUDA kernel: runs the same functions of wkv4_math.h on the host,
// parallel over (batch, block of channels) with at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "wkv4_math.h"

namespace {

// Channels per task: wide enough for the compiler to vectorise the lane loops,
// narrow enough that a task's slice of k, v, y stays in cache across the T steps.
#ifndef WKV_CPU_LANES
#define WKV_CPU_LANES 64
#endif
constexpr int kLanes = WKV_CPU_LANES;

void check_io(const torch::Tensor &x, const char *name, const torch::Tensor &k) {
    TORCH_CHECK(x.device().is_cpu(), "wkv_cpu: ", name, " must be a CPU tensor");
    TORCH_CHECK(x.dim() == 3 && x.size(0) == k.size(0) && x.size(1) == k.size(1) && x.size(2) == k.size(2),
                "wkv_cpu: ", name, " must have shape ", k.sizes(), ", got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == k.scalar_type(), "wkv_cpu: ", name, " must be ", k.scalar_type(), ", got ",
                x.scalar_type());
    // Batch stride is free (chunks are views along T); within a row, (T, C) must be dense.
    TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2) && x.stride(0) == k.stride(0),
                "wkv_cpu: ", name, " must be dense in (T, C) with k's batch stride");
}

void check_f(const torch::Tensor &x, const char *name, at::ScalarType f, at::IntArrayRef shape) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "wkv_cpu: ", name, " must be a contiguous CPU tensor");
    TORCH_CHECK(x.scalar_type() == f, "wkv_cpu: ", name, " must be ", f, ", got ", x.scalar_type());
    TORCH_CHECK(x.sizes() == shape, "wkv_cpu: ", name, " must have shape ", shape, ", got ", x.sizes());
}

at::ScalarType compute_type(const torch::Tensor &k) {
    TORCH_CHECK(k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16 ||
                    k.scalar_type() == at::kHalf || k.scalar_type() == at::kDouble,
                "wkv_cpu: k must be float32, bfloat16, float16 or float64, got ", k.scalar_type());
    return k.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Runtime dispatch to the widest vector unit present (AVX-512, AVX2, else baseline x86-64), so one cached
// build is both fast and safe on any host.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define WKV_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define WKV_CPU_CLONES
#endif

template <typename F, typename IO>
struct Tensors {
    int64_t B, T, C, bs;  // bs: batch stride of k and friends (chunks are views along T)
    const F *w, *u;
    const IO *k, *v, *gy;
    IO *y, *gk, *gv;
    F *state, *gstate, *gw, *gu;
};

// Task i: batch row i / per_row, then kLanes-wide channel blocks, then the leftover channels one by one.
template <typename F, typename IO>
WKV_HD void forward_range(const Tensors<F, IO> &a, int64_t begin, int64_t end) {
    const int64_t blocks = a.C / kLanes, per_row = blocks + a.C % kLanes;
    for (int64_t i = begin; i < end; i++) {
        const int64_t b = i / per_row, n = i % per_row;
        const int64_t c = n < blocks ? n * kLanes : blocks * kLanes + (n - blocks);
        const int64_t o = b * a.bs + c, s = b * a.C + c;
        if (n < blocks)
            wkv_math::forward_lanes<kLanes, F, IO>(a.T, a.C, a.w + c, a.u + c, a.k + o, a.v + o, a.y + o,
                                                  a.state + s, a.B * a.C);
        else
            wkv_math::forward_lanes<1, F, IO>(a.T, a.C, a.w + c, a.u + c, a.k + o, a.v + o, a.y + o, a.state + s,
                                             a.B * a.C);
    }
}

template <typename F, typename IO>
WKV_HD void backward_range(const Tensors<F, IO> &a, int64_t begin, int64_t end) {
    const int64_t blocks = a.C / kLanes, per_row = blocks + a.C % kLanes;
    // Heap scratch for q[], r[]: on the host T is not bounded by a stack array.
    std::vector<F> q(a.T * kLanes), r(a.T * kLanes);
    for (int64_t i = begin; i < end; i++) {
        const int64_t b = i / per_row, n = i % per_row;
        const int64_t c = n < blocks ? n * kLanes : blocks * kLanes + (n - blocks);
        const int64_t o = b * a.bs + c, s = b * a.C + c;
        if (n < blocks)
            wkv_math::backward_lanes<kLanes, F, IO>(a.T, a.C, a.w + c, a.u + c, a.k + o, a.v + o, a.y + o, a.gy + o,
                                                   a.state + s, a.gstate + s, a.B * a.C, a.gw + s, a.gu + s,
                                                   a.gk + o, a.gv + o, q.data(), r.data(), kLanes);
        else
            wkv_math::backward_lanes<1, F, IO>(a.T, a.C, a.w + c, a.u + c, a.k + o, a.v + o, a.y + o, a.gy + o,
                                              a.state + s, a.gstate + s, a.B * a.C, a.gw + s, a.gu + s, a.gk + o,
                                              a.gv + o, q.data(), r.data(), 1);
    }
}

#define WKV_CPU_RANGES(NAME, F, IO)                                                                \
    WKV_CPU_CLONES void forward_##NAME(const Tensors<F, IO> &a, int64_t begin, int64_t end) {      \
        forward_range<F, IO>(a, begin, end);                                                       \
    }                                                                                              \
    WKV_CPU_CLONES void backward_##NAME(const Tensors<F, IO> &a, int64_t begin, int64_t end) {     \
        backward_range<F, IO>(a, begin, end);                                                      \
    }                                                                                              \
    void run(const Tensors<F, IO> &a, bool fwd) {                                                  \
        const int64_t tasks = a.B * (a.C / kLanes + a.C % kLanes);                                 \
        at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {                            \
            fwd ? forward_##NAME(a, begin, end) : backward_##NAME(a, begin, end);                  \
        });                                                                                        \
    }

WKV_CPU_RANGES(f32, float, float)
WKV_CPU_RANGES(f64, double, double)
WKV_CPU_RANGES(bf16, float, at::BFloat16)
WKV_CPU_RANGES(f16, float, at::Half)

template <typename F, typename IO>
Tensors<F, IO> pointers(const torch::Tensor &w, const torch::Tensor &u, const torch::Tensor &k,
                        const torch::Tensor &v, const torch::Tensor &y, const torch::Tensor &state) {
    Tensors<F, IO> a{};
    a.B = k.size(0), a.T = k.size(1), a.C = k.size(2), a.bs = k.stride(0);
    a.w = w.data_ptr<F>(), a.u = u.data_ptr<F>();
    a.k = k.data_ptr<IO>(), a.v = v.data_ptr<IO>(), a.y = y.data_ptr<IO>();
    a.state = state.data_ptr<F>();
    return a;
}

template <typename F, typename IO>
void forward_impl(const torch::Tensor &w, const torch::Tensor &u, const torch::Tensor &k, const torch::Tensor &v,
                  torch::Tensor &y, torch::Tensor &state) {
    run(pointers<F, IO>(w, u, k, v, y, state), true);
}

template <typename F, typename IO>
void backward_impl(const torch::Tensor &w, const torch::Tensor &u, const torch::Tensor &k, const torch::Tensor &v,
                   const torch::Tensor &y, const torch::Tensor &gy, const torch::Tensor &state,
                   torch::Tensor &gstate, torch::Tensor &gw, torch::Tensor &gu, torch::Tensor &gk,
                   torch::Tensor &gv) {
    auto a = pointers<F, IO>(w, u, k, v, y, state);
    a.gy = gy.data_ptr<IO>(), a.gk = gk.data_ptr<IO>(), a.gv = gv.data_ptr<IO>();
    a.gstate = gstate.data_ptr<F>(), a.gw = gw.data_ptr<F>(), a.gu = gu.data_ptr<F>();
    run(a, false);
}

// y and state are written in place: y (B, T, C) like k; state (3, B, C) in the compute type.
void forward(const torch::Tensor &w, const torch::Tensor &u, const torch::Tensor &k, const torch::Tensor &v,
             torch::Tensor y, torch::Tensor state) {
    const auto f = compute_type(k);
    const int64_t B = k.size(0), C = k.size(2);
    check_io(k, "k", k);
    check_io(v, "v", k);
    check_io(y, "y", k);
    check_f(w, "w", f, {C});
    check_f(u, "u", f, {C});
    check_f(state, "state", f, {3, B, C});
    if (k.scalar_type() == at::kFloat)
        forward_impl<float, float>(w, u, k, v, y, state);
    else if (k.scalar_type() == at::kDouble)
        forward_impl<double, double>(w, u, k, v, y, state);
    else if (k.scalar_type() == at::kHalf)
        forward_impl<float, at::Half>(w, u, k, v, y, state);
    else
        forward_impl<float, at::BFloat16>(w, u, k, v, y, state);
}

// gk, gv (like k), gw, gu ((B, C), compute type) are written; gstate (3, B, C) is read and overwritten.
void backward(const torch::Tensor &w, const torch::Tensor &u, const torch::Tensor &k, const torch::Tensor &v,
              const torch::Tensor &y, const torch::Tensor &gy, const torch::Tensor &state, torch::Tensor gstate,
              torch::Tensor gw, torch::Tensor gu, torch::Tensor gk, torch::Tensor gv) {
    const auto f = compute_type(k);
    const int64_t B = k.size(0), C = k.size(2);
    check_io(k, "k", k);
    check_io(v, "v", k);
    check_io(y, "y", k);
    check_io(gy, "gy", k);
    check_io(gk, "gk", k);
    check_io(gv, "gv", k);
    check_f(w, "w", f, {C});
    check_f(u, "u", f, {C});
    check_f(state, "state", f, {3, B, C});
    check_f(gstate, "gstate", f, {3, B, C});
    check_f(gw, "gw", f, {B, C});
    check_f(gu, "gu", f, {B, C});
    if (k.scalar_type() == at::kFloat)
        backward_impl<float, float>(w, u, k, v, y, gy, state, gstate, gw, gu, gk, gv);
    else if (k.scalar_type() == at::kDouble)
        backward_impl<double, double>(w, u, k, v, y, gy, state, gstate, gw, gu, gk, gv);
    else if (k.scalar_type() == at::kHalf)
        backward_impl<float, at::Half>(w, u, k, v, y, gy, state, gstate, gw, gu, gk, gv);
    else
        backward_impl<float, at::BFloat16>(w, u, k, v, y, gy, state, gstate, gw, gu, gk, gv);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "WKV forward on CPU (in place: y, state)");
    m.def("backward", &backward, "WKV backward on CPU (in place: gstate, gw, gu, gk, gv)");
}
