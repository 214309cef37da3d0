// Torch binding of the WKV-7 CUDA kernels (wkv7_cuda.cu): fp32 and bf16 I/O, fp32 state, checkpoints and
// sa. Same interface as the CPU twin (wkv7_cpu.cpp) plus the CUDA stream, which train/wkv7.py passes in
// (as an integer, with the tensors' device current) so this file needs only the CUDA runtime's headers
// and can be compile-checked against a CPU build of torch. Every output and scratch buffer is allocated
// by the caller from PyTorch's allocator; nothing here synchronises with the host.
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <string>

#define WKV7_DECLARE(NAME, IO)                                                                               \
    void wkv7_cuda_forward_##NAME(int B, int T, int H, const IO *r, const IO *w, const IO *k, const IO *v,    \
                                  const IO *a, const IO *b, const float *s0, IO *y, float *s_out, float *ckpt, \
                                  float *sa, cudaStream_t stream);                                            \
    void wkv7_cuda_backward_##NAME(int B, int T, int H, const IO *r, const IO *w, const IO *k, const IO *v,   \
                                   const IO *a, const IO *b, const IO *gy, const float *ckpt, const float *sa, \
                                   const float *gs_out, float *gs_in, IO *gr, IO *gw, IO *gk, IO *gv, IO *ga, \
                                   IO *gb, cudaStream_t stream);

WKV7_DECLARE(fp32, float)
WKV7_DECLARE(bf16, c10::BFloat16)

namespace {

constexpr int64_t kN = 64;  // the head size the kernels are compiled for
constexpr int64_t kChunk = 16;  // wkv7_math::CHUNK

void check_io(const torch::Tensor &x, const char *name, const torch::Tensor &r) {
    TORCH_CHECK(x.is_cuda() && x.device() == r.device(), "wkv7_cuda: ", name, " must be on ", r.device());
    TORCH_CHECK(x.sizes() == r.sizes(), "wkv7_cuda: ", name, " must have shape ", r.sizes(), ", got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == r.scalar_type(), "wkv7_cuda: ", name, " must be ", r.scalar_type(), ", got ",
                x.scalar_type());
    TORCH_CHECK(x.is_contiguous(), "wkv7_cuda: ", name, " must be contiguous");
}

void check_f(const torch::Tensor &x, const char *name, const torch::Tensor &r, at::IntArrayRef shape) {
    TORCH_CHECK(x.is_cuda() && x.device() == r.device() && x.is_contiguous(), "wkv7_cuda: ", name,
                " must be contiguous on ", r.device());
    TORCH_CHECK(x.scalar_type() == at::kFloat, "wkv7_cuda: ", name, " must be float32, got ", x.scalar_type());
    TORCH_CHECK(x.sizes() == shape, "wkv7_cuda: ", name, " must have shape ", shape, ", got ", x.sizes());
}

void check_r(const torch::Tensor &r) {
    TORCH_CHECK(r.scalar_type() == at::kFloat || r.scalar_type() == at::kBFloat16,
                "wkv7_cuda: inputs must be float32 or bfloat16, got ", r.scalar_type());
    TORCH_CHECK(r.dim() == 4 && r.size(3) == kN, "wkv7_cuda: r must be (B, T, H, ", kN, "), got ", r.sizes());
    TORCH_CHECK(r.size(1) <= INT32_MAX && r.size(0) <= 65535 && r.size(2) <= INT32_MAX,
                "wkv7_cuda: B, T or H too large: ", r.sizes());
}

// The six (B, T, H, N) tensors of one call, named r, w, k, v, a, b with a prefix ("" or "g").
void check_inputs(const torch::Tensor &r, const torch::Tensor &w, const torch::Tensor &k, const torch::Tensor &v,
                  const torch::Tensor &a, const torch::Tensor &b, const torch::Tensor &like, const std::string &p) {
    const torch::Tensor *xs[] = {&r, &w, &k, &v, &a, &b};
    const char *names[] = {"r", "w", "k", "v", "a", "b"};
    for (int n = 0; n < 6; n++) check_io(*xs[n], (p + names[n]).c_str(), like);
}

void check_inputs(const torch::Tensor &r, const torch::Tensor &w, const torch::Tensor &k, const torch::Tensor &v,
                  const torch::Tensor &a, const torch::Tensor &b) {
    check_inputs(r, w, k, v, a, b, r, "");
}

void check_launch() {
    const cudaError_t err = cudaGetLastError();
    TORCH_CHECK(err == cudaSuccess, "wkv7_cuda: kernel launch failed: ", cudaGetErrorString(err));
}

template <typename T>
T *ptr(const torch::Tensor &x) { return reinterpret_cast<T *>(x.data_ptr()); }

}  // namespace

// Writes y, s_out (final state), ckpt (B, H, ceil(T/16), N, N) and sa (B, T, H, N), starting from s0.
void forward(const torch::Tensor &r, const torch::Tensor &w, const torch::Tensor &k, const torch::Tensor &v,
             const torch::Tensor &a, const torch::Tensor &b, const torch::Tensor &s0, torch::Tensor y,
             torch::Tensor s_out, torch::Tensor ckpt, torch::Tensor sa, int64_t stream_handle) {
    check_r(r);
    check_inputs(r, w, k, v, a, b);
    check_io(y, "y", r);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
    check_f(s0, "s0", r, {B, H, kN, kN});
    check_f(s_out, "s_out", r, {B, H, kN, kN});
    check_f(ckpt, "ckpt", r, {B, H, (T + kChunk - 1) / kChunk, kN, kN});
    check_f(sa, "sa", r, {B, T, H, kN});
    if (T == 0) {
        s_out.copy_(s0);
        return;
    }
    const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    if (r.scalar_type() == at::kFloat)
        wkv7_cuda_forward_fp32(B, T, H, ptr<float>(r), ptr<float>(w), ptr<float>(k), ptr<float>(v), ptr<float>(a),
                               ptr<float>(b), ptr<float>(s0), ptr<float>(y), ptr<float>(s_out), ptr<float>(ckpt),
                               ptr<float>(sa), stream);
    else
        wkv7_cuda_forward_bf16(B, T, H, ptr<c10::BFloat16>(r), ptr<c10::BFloat16>(w), ptr<c10::BFloat16>(k),
                               ptr<c10::BFloat16>(v), ptr<c10::BFloat16>(a), ptr<c10::BFloat16>(b), ptr<float>(s0),
                               ptr<c10::BFloat16>(y), ptr<float>(s_out), ptr<float>(ckpt), ptr<float>(sa), stream);
    check_launch();
}

// From gy and gs_out (dL/d final state) writes gs_in (dL/d initial state) and the six input gradients.
void backward(const torch::Tensor &r, const torch::Tensor &w, const torch::Tensor &k, const torch::Tensor &v,
              const torch::Tensor &a, const torch::Tensor &b, const torch::Tensor &gy, const torch::Tensor &ckpt,
              const torch::Tensor &sa, const torch::Tensor &gs_out, torch::Tensor gs_in, torch::Tensor gr,
              torch::Tensor gw, torch::Tensor gk, torch::Tensor gv, torch::Tensor ga, torch::Tensor gb,
              int64_t stream_handle) {
    check_r(r);
    check_inputs(r, w, k, v, a, b);
    check_io(gy, "gy", r);
    check_inputs(gr, gw, gk, gv, ga, gb, r, "g");
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
    check_f(ckpt, "ckpt", r, {B, H, (T + kChunk - 1) / kChunk, kN, kN});
    check_f(sa, "sa", r, {B, T, H, kN});
    check_f(gs_out, "gs_out", r, {B, H, kN, kN});
    check_f(gs_in, "gs_in", r, {B, H, kN, kN});
    if (T == 0) {
        gs_in.copy_(gs_out);
        return;
    }
    const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    if (r.scalar_type() == at::kFloat)
        wkv7_cuda_backward_fp32(B, T, H, ptr<float>(r), ptr<float>(w), ptr<float>(k), ptr<float>(v), ptr<float>(a),
                                ptr<float>(b), ptr<float>(gy), ptr<float>(ckpt), ptr<float>(sa), ptr<float>(gs_out),
                                ptr<float>(gs_in), ptr<float>(gr), ptr<float>(gw), ptr<float>(gk), ptr<float>(gv),
                                ptr<float>(ga), ptr<float>(gb), stream);
    else
        wkv7_cuda_backward_bf16(B, T, H, ptr<c10::BFloat16>(r), ptr<c10::BFloat16>(w), ptr<c10::BFloat16>(k),
                                ptr<c10::BFloat16>(v), ptr<c10::BFloat16>(a), ptr<c10::BFloat16>(b),
                                ptr<c10::BFloat16>(gy), ptr<float>(ckpt), ptr<float>(sa), ptr<float>(gs_out),
                                ptr<float>(gs_in), ptr<c10::BFloat16>(gr), ptr<c10::BFloat16>(gw),
                                ptr<c10::BFloat16>(gk), ptr<c10::BFloat16>(gv), ptr<c10::BFloat16>(ga),
                                ptr<c10::BFloat16>(gb), stream);
    check_launch();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward,
          "WKV-7 forward on CUDA (in place: y, s_out, ckpt, sa); last argument: cudaStream_t as int");
    m.def("backward", &backward,
          "WKV-7 backward on CUDA (in place: gs_in and the six input gradients); last argument: cudaStream_t as int");
}
