// Torch binding of the WKV-6 CUDA kernels (wkv6_cuda.cu): fp32 and bf16 I/O, fp32 u, state, checkpoints
// and scratch. Same interface as the CPU twin (wkv6_cpu.cpp) plus the CUDA stream, which train/wkv6.py
// passes in (as an integer, with the tensors' device current) so this file needs only the CUDA runtime's
// headers and can be compile-checked against a CPU build of torch. Every output and scratch buffer is
// allocated by the caller from PyTorch's allocator; nothing here synchronises with the host.
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#define WKV6_DECLARE(NAME, IO)                                                                              \
    void wkv6_cuda_forward_##NAME(int B, int T, int H, const IO *r, const IO *w, const IO *k, const IO *v,   \
                                  const float *u, const float *s0, IO *y, float *s_out, float *ckpt,         \
                                  cudaStream_t stream);                                                      \
    void wkv6_cuda_backward_##NAME(int B, int T, int H, const IO *r, const IO *w, const IO *k, const IO *v,  \
                                   const float *u, const IO *gy, const float *ckpt, const float *gs_out,     \
                                   float *scratch, float *gs_in, IO *gr, IO *gw, IO *gk, IO *gv, float *gu,  \
                                   cudaStream_t stream);

WKV6_DECLARE(fp32, float)
WKV6_DECLARE(bf16, c10::BFloat16)

namespace {

constexpr int64_t kN = 64;  // the head size the kernels are compiled for
constexpr int64_t kChunk = 16;  // wkv6_math::CHUNK

void check_io(const torch::Tensor &x, const char *name, const torch::Tensor &r) {
    TORCH_CHECK(x.is_cuda() && x.device() == r.device(), "wkv6_cuda: ", name, " must be on ", r.device());
    TORCH_CHECK(x.sizes() == r.sizes(), "wkv6_cuda: ", name, " must have shape ", r.sizes(), ", got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == r.scalar_type(), "wkv6_cuda: ", name, " must be ", r.scalar_type(), ", got ",
                x.scalar_type());
    TORCH_CHECK(x.is_contiguous(), "wkv6_cuda: ", name, " must be contiguous");
}

void check_f(const torch::Tensor &x, const char *name, const torch::Tensor &r, at::IntArrayRef shape) {
    TORCH_CHECK(x.is_cuda() && x.device() == r.device() && x.is_contiguous(), "wkv6_cuda: ", name,
                " must be contiguous on ", r.device());
    TORCH_CHECK(x.scalar_type() == at::kFloat, "wkv6_cuda: ", name, " must be float32, got ", x.scalar_type());
    TORCH_CHECK(x.sizes() == shape, "wkv6_cuda: ", name, " must have shape ", shape, ", got ", x.sizes());
}

// Checks r, w, k, v, u and the checkpoints.
void check_common(const torch::Tensor &r, const torch::Tensor &w, const torch::Tensor &k, const torch::Tensor &v,
                  const torch::Tensor &u, const torch::Tensor &ckpt) {
    TORCH_CHECK(r.scalar_type() == at::kFloat || r.scalar_type() == at::kBFloat16,
                "wkv6_cuda: inputs must be float32 or bfloat16, got ", r.scalar_type());
    TORCH_CHECK(r.dim() == 4 && r.size(3) == kN, "wkv6_cuda: r must be (B, T, H, ", kN, "), got ", r.sizes());
    TORCH_CHECK(r.size(1) <= INT32_MAX && r.size(0) <= 65535 && r.size(2) <= INT32_MAX,
                "wkv6_cuda: B, T or H too large: ", r.sizes());
    check_io(r, "r", r), check_io(w, "w", r), check_io(k, "k", r), check_io(v, "v", r);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
    check_f(u, "u", r, {H, kN});
    check_f(ckpt, "ckpt", r, {B, H, (T + kChunk - 1) / kChunk, kN, kN});
}

void check_launch() {
    const cudaError_t err = cudaGetLastError();
    TORCH_CHECK(err == cudaSuccess, "wkv6_cuda: kernel launch failed: ", cudaGetErrorString(err));
}

template <typename T>
T *ptr(const torch::Tensor &x) { return reinterpret_cast<T *>(x.data_ptr()); }

}  // namespace

// Writes y, s_out (final state) and ckpt (B, H, ceil(T/16), N, N), starting from s0.
void forward(const torch::Tensor &r, const torch::Tensor &w, const torch::Tensor &k, const torch::Tensor &v,
             const torch::Tensor &u, const torch::Tensor &s0, torch::Tensor y, torch::Tensor s_out,
             torch::Tensor ckpt, int64_t stream_handle) {
    check_common(r, w, k, v, u, ckpt);
    check_io(y, "y", r);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
    check_f(s0, "s0", r, {B, H, kN, kN});
    check_f(s_out, "s_out", r, {B, H, kN, kN});
    if (T == 0) {
        s_out.copy_(s0);
        return;
    }
    const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    using bf = c10::BFloat16;
    if (r.scalar_type() == at::kFloat)
        wkv6_cuda_forward_fp32(B, T, H, ptr<float>(r), ptr<float>(w), ptr<float>(k), ptr<float>(v), ptr<float>(u),
                               ptr<float>(s0), ptr<float>(y), ptr<float>(s_out), ptr<float>(ckpt), stream);
    else
        wkv6_cuda_forward_bf16(B, T, H, ptr<bf>(r), ptr<bf>(w), ptr<bf>(k), ptr<bf>(v), ptr<float>(u),
                               ptr<float>(s0), ptr<bf>(y), ptr<float>(s_out), ptr<float>(ckpt), stream);
    check_launch();
}

// From gy and gs_out (dL/d final state) writes gs_in (dL/d initial state), gr, gw, gk, gv and gu
// (B, H, N: dL/du per batch, summed over time); scratch (B, H, 16, N, N) holds a chunk's recomputed states.
void backward(const torch::Tensor &r, const torch::Tensor &w, const torch::Tensor &k, const torch::Tensor &v,
              const torch::Tensor &u, const torch::Tensor &gy, const torch::Tensor &ckpt,
              const torch::Tensor &gs_out, torch::Tensor scratch, torch::Tensor gs_in, torch::Tensor gr,
              torch::Tensor gw, torch::Tensor gk, torch::Tensor gv, torch::Tensor gu, int64_t stream_handle) {
    check_common(r, w, k, v, u, ckpt);
    check_io(gy, "gy", r), check_io(gr, "gr", r), check_io(gw, "gw", r), check_io(gk, "gk", r);
    check_io(gv, "gv", r);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
    check_f(gs_out, "gs_out", r, {B, H, kN, kN});
    check_f(gs_in, "gs_in", r, {B, H, kN, kN});
    check_f(scratch, "scratch", r, {B, H, kChunk, kN, kN});
    check_f(gu, "gu", r, {B, H, kN});
    if (T == 0) {
        gs_in.copy_(gs_out);
        gu.zero_();
        return;
    }
    const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    using bf = c10::BFloat16;
    if (r.scalar_type() == at::kFloat)
        wkv6_cuda_backward_fp32(B, T, H, ptr<float>(r), ptr<float>(w), ptr<float>(k), ptr<float>(v), ptr<float>(u),
                                ptr<float>(gy), ptr<float>(ckpt), ptr<float>(gs_out), ptr<float>(scratch),
                                ptr<float>(gs_in), ptr<float>(gr), ptr<float>(gw), ptr<float>(gk), ptr<float>(gv),
                                ptr<float>(gu), stream);
    else
        wkv6_cuda_backward_bf16(B, T, H, ptr<bf>(r), ptr<bf>(w), ptr<bf>(k), ptr<bf>(v), ptr<float>(u), ptr<bf>(gy),
                                ptr<float>(ckpt), ptr<float>(gs_out), ptr<float>(scratch), ptr<float>(gs_in),
                                ptr<bf>(gr), ptr<bf>(gw), ptr<bf>(gk), ptr<bf>(gv), ptr<float>(gu), stream);
    check_launch();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "WKV-6 forward on CUDA (in place: y, s_out, ckpt); last argument: cudaStream_t as int");
    m.def("backward", &backward,
          "WKV-6 backward on CUDA (in place: scratch, gs_in, gr, gw, gk, gv, gu); last argument: cudaStream_t as int");
}
