// CPU twin of the WKV CUDA kernel: runs the same functions of wkv_math.h on the host,
// parallel over (batch, block of channels) with at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "wkv_math.h"

namespace {

// Channels per task: wide enough for the compiler to vectorise the lane loops,
// narrow enough that a task's slice of k, v, y stays in cache across the T steps.
constexpr int kLanes = 16;

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
                    k.scalar_type() == at::kDouble,
                "wkv_cpu: k must be float32, bfloat16 or float64, got ", k.scalar_type());
    return k.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename F, typename IO>
void forward_impl(const torch::Tensor &w, const torch::Tensor &u, const torch::Tensor &k, const torch::Tensor &v,
                  torch::Tensor &y, torch::Tensor &state) {
    const int64_t B = k.size(0), T = k.size(1), C = k.size(2), bs = k.stride(0);
    const int64_t blocks = C / kLanes, rest = C - blocks * kLanes, per_row = blocks + rest;
    const F *pw = w.data_ptr<F>(), *pu = u.data_ptr<F>();
    const IO *pk = k.data_ptr<IO>(), *pv = v.data_ptr<IO>();
    IO *py = y.data_ptr<IO>();
    F *ps = state.data_ptr<F>();
    at::parallel_for(0, B * per_row, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; i++) {
            const int64_t b = i / per_row, n = i % per_row;
            const int64_t c = n < blocks ? n * kLanes : blocks * kLanes + (n - blocks);
            const int64_t o = b * bs + c;
            if (n < blocks)
                wkv_math::forward_lanes<kLanes, F, IO>(T, C, pw + c, pu + c, pk + o, pv + o, py + o, ps + b * C + c,
                                                      B * C);
            else
                wkv_math::forward_lanes<1, F, IO>(T, C, pw + c, pu + c, pk + o, pv + o, py + o, ps + b * C + c,
                                                 B * C);
        }
    });
}

template <typename F, typename IO>
void backward_impl(const torch::Tensor &w, const torch::Tensor &u, const torch::Tensor &k, const torch::Tensor &v,
                   const torch::Tensor &y, const torch::Tensor &gy, const torch::Tensor &state,
                   torch::Tensor &gstate, torch::Tensor &gw, torch::Tensor &gu, torch::Tensor &gk,
                   torch::Tensor &gv) {
    const int64_t B = k.size(0), T = k.size(1), C = k.size(2), bs = k.stride(0);
    const int64_t blocks = C / kLanes, rest = C - blocks * kLanes, per_row = blocks + rest;
    const F *pw = w.data_ptr<F>(), *pu = u.data_ptr<F>();
    const IO *pk = k.data_ptr<IO>(), *pv = v.data_ptr<IO>(), *py = y.data_ptr<IO>(), *pgy = gy.data_ptr<IO>();
    const F *ps = state.data_ptr<F>();
    F *pgs = gstate.data_ptr<F>(), *pgw = gw.data_ptr<F>(), *pgu = gu.data_ptr<F>();
    IO *pgk = gk.data_ptr<IO>(), *pgv = gv.data_ptr<IO>();
    at::parallel_for(0, B * per_row, 1, [&](int64_t begin, int64_t end) {
        // Heap scratch for q[], r[]: on the host T is not bounded by a stack array.
        std::vector<F> q(T * kLanes), r(T * kLanes);
        for (int64_t i = begin; i < end; i++) {
            const int64_t b = i / per_row, n = i % per_row;
            const int64_t c = n < blocks ? n * kLanes : blocks * kLanes + (n - blocks);
            const int64_t o = b * bs + c, s = b * C + c;
            if (n < blocks)
                wkv_math::backward_lanes<kLanes, F, IO>(T, C, pw + c, pu + c, pk + o, pv + o, py + o, pgy + o, ps + s,
                                                       pgs + s, B * C, pgw + s, pgu + s, pgk + o, pgv + o, q.data(),
                                                       r.data());
            else
                wkv_math::backward_lanes<1, F, IO>(T, C, pw + c, pu + c, pk + o, pv + o, py + o, pgy + o, ps + s,
                                                  pgs + s, B * C, pgw + s, pgu + s, pgk + o, pgv + o, q.data(),
                                                  r.data());
        }
    });
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
    else
        backward_impl<float, at::BFloat16>(w, u, k, v, y, gy, state, gstate, gw, gu, gk, gv);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "WKV forward on CPU (in place: y, state)");
    m.def("backward", &backward, "WKV backward on CPU (in place: gstate, gw, gu, gk, gv)");
    m.attr("t_max") = -1;  // no compile-time bound on the host
}
