// Torch binding of the WKV CUDA kernels (wkv_cuda.cu): fp32 and bf16 I/O, fp32 state and gradients of w, u.
// Same interface as the CPU twin (wkv_cpu.cpp) plus the CUDA stream, which train/wkv.py passes in (as an
// integer, with the tensors' device current) so this file needs only the CUDA runtime's headers and can be
// compile-checked against a CPU build of torch.
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#ifndef WKV_T_MAX
#define WKV_T_MAX 1024
#endif

void wkv_cuda_forward_fp32(int B, int T, int C, long long bs, const float *w, const float *u, const float *k,
                           const float *v, float *y, float *state, cudaStream_t stream);
void wkv_cuda_backward_fp32(int B, int T, int C, long long bs, const float *w, const float *u, const float *k,
                            const float *v, const float *y, const float *gy, const float *state, float *gstate,
                            float *gw, float *gu, float *gk, float *gv, cudaStream_t stream);
void wkv_cuda_forward_bf16(int B, int T, int C, long long bs, const float *w, const float *u,
                           const c10::BFloat16 *k, const c10::BFloat16 *v, c10::BFloat16 *y, float *state,
                           cudaStream_t stream);
void wkv_cuda_backward_bf16(int B, int T, int C, long long bs, const float *w, const float *u,
                            const c10::BFloat16 *k, const c10::BFloat16 *v, const c10::BFloat16 *y,
                            const c10::BFloat16 *gy, const float *state, float *gstate, float *gw, float *gu,
                            c10::BFloat16 *gk, c10::BFloat16 *gv, cudaStream_t stream);

namespace {

void check_io(const torch::Tensor &x, const char *name, const torch::Tensor &k) {
    TORCH_CHECK(x.is_cuda() && x.device() == k.device(), "wkv_cuda: ", name, " must be on ", k.device());
    TORCH_CHECK(x.dim() == 3 && x.sizes() == k.sizes(), "wkv_cuda: ", name, " must have shape ", k.sizes(),
                ", got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == k.scalar_type(), "wkv_cuda: ", name, " must be ", k.scalar_type());
    TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2) && x.stride(0) == k.stride(0),
                "wkv_cuda: ", name, " must be dense in (T, C) with k's batch stride");
}

void check_f(const torch::Tensor &x, const char *name, const torch::Tensor &k, at::IntArrayRef shape) {
    TORCH_CHECK(x.is_cuda() && x.device() == k.device() && x.is_contiguous(), "wkv_cuda: ", name,
                " must be contiguous on ", k.device());
    TORCH_CHECK(x.scalar_type() == at::kFloat, "wkv_cuda: ", name, " must be float32");
    TORCH_CHECK(x.sizes() == shape, "wkv_cuda: ", name, " must have shape ", shape, ", got ", x.sizes());
}

void check_common(const torch::Tensor &w, const torch::Tensor &u, const torch::Tensor &k) {
    TORCH_CHECK(k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16,
                "wkv_cuda: k must be float32 or bfloat16, got ", k.scalar_type());
    TORCH_CHECK(k.dim() == 3, "wkv_cuda: k must be (B, T, C)");
    TORCH_CHECK(k.size(1) <= WKV_T_MAX, "wkv_cuda: ", k.size(1), " steps in one call exceed T_MAX = ", WKV_T_MAX,
                " (the model config's ctx_len the kernel was built for); wkv() chunks longer sequences");
    check_f(w, "w", k, {k.size(2)});
    check_f(u, "u", k, {k.size(2)});
}

void check_launch() {
    const cudaError_t err = cudaGetLastError();
    TORCH_CHECK(err == cudaSuccess, "wkv_cuda: kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

void forward(const torch::Tensor &w, const torch::Tensor &u, const torch::Tensor &k, const torch::Tensor &v,
             torch::Tensor y, torch::Tensor state, int64_t stream_handle) {
    check_common(w, u, k);
    check_io(v, "v", k);
    check_io(y, "y", k);
    const int B = k.size(0), T = k.size(1), C = k.size(2);
    check_f(state, "state", k, {3, B, C});
    const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    if (k.scalar_type() == at::kFloat)
        wkv_cuda_forward_fp32(B, T, C, k.stride(0), w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr<float>(),
                              v.data_ptr<float>(), y.data_ptr<float>(), state.data_ptr<float>(), stream);
    else
        wkv_cuda_forward_bf16(B, T, C, k.stride(0), w.data_ptr<float>(), u.data_ptr<float>(),
                              k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(),
                              state.data_ptr<float>(), stream);
    check_launch();
}

void backward(const torch::Tensor &w, const torch::Tensor &u, const torch::Tensor &k, const torch::Tensor &v,
              const torch::Tensor &y, const torch::Tensor &gy, const torch::Tensor &state, torch::Tensor gstate,
              torch::Tensor gw, torch::Tensor gu, torch::Tensor gk, torch::Tensor gv, int64_t stream_handle) {
    check_common(w, u, k);
    check_io(v, "v", k);
    check_io(y, "y", k);
    check_io(gy, "gy", k);
    check_io(gk, "gk", k);
    check_io(gv, "gv", k);
    const int B = k.size(0), T = k.size(1), C = k.size(2);
    check_f(state, "state", k, {3, B, C});
    check_f(gstate, "gstate", k, {3, B, C});
    check_f(gw, "gw", k, {B, C});
    check_f(gu, "gu", k, {B, C});
    const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    if (k.scalar_type() == at::kFloat)
        wkv_cuda_backward_fp32(B, T, C, k.stride(0), w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr<float>(),
                               v.data_ptr<float>(), y.data_ptr<float>(), gy.data_ptr<float>(),
                               state.data_ptr<float>(), gstate.data_ptr<float>(), gw.data_ptr<float>(),
                               gu.data_ptr<float>(), gk.data_ptr<float>(), gv.data_ptr<float>(), stream);
    else
        wkv_cuda_backward_bf16(B, T, C, k.stride(0), w.data_ptr<float>(), u.data_ptr<float>(),
                               k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(),
                               gy.data_ptr<c10::BFloat16>(), state.data_ptr<float>(), gstate.data_ptr<float>(),
                               gw.data_ptr<float>(), gu.data_ptr<float>(), gk.data_ptr<c10::BFloat16>(),
                               gv.data_ptr<c10::BFloat16>(), stream);
    check_launch();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "WKV forward on CUDA (in place: y, state); last argument: cudaStream_t as int");
    m.def("backward", &backward, "WKV backward on CUDA (in place: gstate, gw, gu, gk, gv); last argument: cudaStream_t as int");
    m.attr("t_max") = WKV_T_MAX;
}
