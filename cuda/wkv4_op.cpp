// Torch binding of the WKV CUDA kernels (wkv4_cuda.cu): fp32, bf16 and fp16 I/O, fp32 state and gradients of
// w, u. Same interface as the CPU twin (wkv4_cpu.cpp) plus the CUDA stream, which train/wkv.py passes in (as an
// integer, with the tensors' device current) so this file needs only the CUDA runtime's headers and can be
// compile-checked against a CPU build of torch.
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#define WKV_DECLARE(NAME, IO)                                                                                   \
    void wkv_cuda_forward_##NAME(int B, int T, int C, long long bs, const float *w, const float *u, const IO *k, \
                                 const IO *v, IO *y, float *state, cudaStream_t stream);                        \
    void wkv_cuda_backward_##NAME(int B, int T, int C, long long bs, const float *w, const float *u,             \
                                  const IO *k, const IO *v, const IO *y, const IO *gy, const float *state,      \
                                  float *gstate, float *gw, float *gu, IO *gk, IO *gv, float *scratch,          \
                                  cudaStream_t stream);

WKV_DECLARE(fp32, float)
WKV_DECLARE(bf16, c10::BFloat16)
WKV_DECLARE(fp16, c10::Half)

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
    TORCH_CHECK(k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16 || k.scalar_type() == at::kHalf,
                "wkv_cuda: k must be float32, bfloat16 or float16, got ", k.scalar_type());
    TORCH_CHECK(k.dim() == 3, "wkv_cuda: k must be (B, T, C)");
    TORCH_CHECK(k.size(0) * k.size(2) <= INT32_MAX, "wkv_cuda: B * C = ", k.size(0) * k.size(2), " is too large");
    check_f(w, "w", k, {k.size(2)});
    check_f(u, "u", k, {k.size(2)});
}

void check_launch() {
    const cudaError_t err = cudaGetLastError();
    TORCH_CHECK(err == cudaSuccess, "wkv_cuda: kernel launch failed: ", cudaGetErrorString(err));
}

template <typename T>
T *ptr(const torch::Tensor &x) { return reinterpret_cast<T *>(x.data_ptr()); }

}  // namespace

void forward(const torch::Tensor &w, const torch::Tensor &u, const torch::Tensor &k, const torch::Tensor &v,
             torch::Tensor y, torch::Tensor state, int64_t stream_handle) {
    check_common(w, u, k);
    check_io(v, "v", k);
    check_io(y, "y", k);
    const int B = k.size(0), T = k.size(1), C = k.size(2);
    check_f(state, "state", k, {3, B, C});
    const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    const float *wp = ptr<float>(w), *up = ptr<float>(u);
    float *sp = ptr<float>(state);
    switch (k.scalar_type()) {
        case at::kFloat:
            wkv_cuda_forward_fp32(B, T, C, k.stride(0), wp, up, ptr<float>(k), ptr<float>(v), ptr<float>(y), sp,
                                  stream);
            break;
        case at::kBFloat16:
            wkv_cuda_forward_bf16(B, T, C, k.stride(0), wp, up, ptr<c10::BFloat16>(k), ptr<c10::BFloat16>(v),
                                  ptr<c10::BFloat16>(y), sp, stream);
            break;
        default:
            wkv_cuda_forward_fp16(B, T, C, k.stride(0), wp, up, ptr<c10::Half>(k), ptr<c10::Half>(v),
                                  ptr<c10::Half>(y), sp, stream);
    }
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
    // Per-step scratch through PyTorch's caching allocator (counted, reused, freed with the stream's order).
    const auto scratch = torch::empty({2, B, T, C}, k.options().dtype(at::kFloat));
    const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    const float *wp = ptr<float>(w), *up = ptr<float>(u), *sp = ptr<float>(state);
    float *gsp = ptr<float>(gstate), *gwp = ptr<float>(gw), *gup = ptr<float>(gu), *scp = ptr<float>(scratch);
    switch (k.scalar_type()) {
        case at::kFloat:
            wkv_cuda_backward_fp32(B, T, C, k.stride(0), wp, up, ptr<float>(k), ptr<float>(v), ptr<float>(y),
                                   ptr<float>(gy), sp, gsp, gwp, gup, ptr<float>(gk), ptr<float>(gv), scp, stream);
            break;
        case at::kBFloat16:
            wkv_cuda_backward_bf16(B, T, C, k.stride(0), wp, up, ptr<c10::BFloat16>(k), ptr<c10::BFloat16>(v),
                                   ptr<c10::BFloat16>(y), ptr<c10::BFloat16>(gy), sp, gsp, gwp, gup,
                                   ptr<c10::BFloat16>(gk), ptr<c10::BFloat16>(gv), scp, stream);
            break;
        default:
            wkv_cuda_backward_fp16(B, T, C, k.stride(0), wp, up, ptr<c10::Half>(k), ptr<c10::Half>(v),
                                   ptr<c10::Half>(y), ptr<c10::Half>(gy), sp, gsp, gwp, gup, ptr<c10::Half>(gk),
                                   ptr<c10::Half>(gv), scp, stream);
    }
    check_launch();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "WKV forward on CUDA (in place: y, state); last argument: cudaStream_t as int");
    m.def("backward", &backward, "WKV backward on CUDA (in place: gstate, gw, gu, gk, gv); last argument: cudaStream_t as int");
}
