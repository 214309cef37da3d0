"""Building the WKV kernels: nvcc compiles the CUDA sources for sm_80 and sm_90 without a GPU, the CUDA
binding compiles against torch's headers, and a failed build reports the compiler's own message."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from machine import cxx_missing
from torch.utils import cpp_extension

import train.wkv as wkv_mod
import train.wkv6 as wkv6_mod
import train.wkv7 as wkv7_mod
from train import ext_build
from train.wkv import CUDA_CFLAGS, CUDA_SRC_DIR, WKVBuildError, build_extension, wkv, wkv_reference

# Each CUDA source: the flags its wkv module builds it with, and how many kernels ptxas must report per
# architecture (RWKV-4: forward and backward for fp32, bf16 and fp16; WKV-6 and WKV-7: the same for fp32
# and bf16).
CUDA_SOURCES = {
    "wkv4_cuda.cu": (CUDA_CFLAGS, 6),
    "wkv6_cuda.cu": (wkv6_mod.CUDA_CFLAGS, 4),
    "wkv7_cuda.cu": (wkv7_mod.CUDA_CFLAGS, 4),
}
BINDINGS = ("wkv4_op.cpp", "wkv6_op.cpp", "wkv7_op.cpp")


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = Path(home) / "bin" / "nvcc"
    return shutil.which("nvcc") or (str(candidate) if candidate.exists() else None)


def cuda_include_dir() -> Path | None:
    nvcc = find_nvcc()
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc is not None:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    for home in filter(None, homes):
        if (Path(home) / "include" / "cuda_runtime_api.h").exists():
            return Path(home) / "include"
    return None


TORCH_INCLUDES = [f"-I{p}" for p in cpp_extension.include_paths()]
TARGETS = ("compute_80", "compute_90")


def nvcc_missing_targets() -> str | None:
    """Why nvcc cannot build for sm_80 and sm_90 here (None: it can); asked of nvcc itself, since an
    older toolkit (before CUDA 11.8) has nvcc but no sm_90."""
    nvcc = find_nvcc()
    if nvcc is None:
        return "nvcc not found (no CUDA toolkit on this machine)"
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
    missing = [t for t in TARGETS if t not in listed.stdout.split()]
    if listed.returncode != 0 or missing:
        return f"{nvcc} cannot target {', '.join(missing or TARGETS)} (`nvcc --list-gpu-arch`)"
    return None


def test_every_cuda_source_is_compile_checked():
    assert sorted(p.name for p in CUDA_SRC_DIR.glob("*.cu")) == sorted(CUDA_SOURCES)
    assert sorted(p.name for p in CUDA_SRC_DIR.glob("*_op.cpp")) == sorted(BINDINGS)


@pytest.mark.skipif(nvcc_missing_targets() is not None, reason=str(nvcc_missing_targets()))
@pytest.mark.parametrize("source", sorted(CUDA_SOURCES))
def test_nvcc_compiles_kernel_for_sm80_and_sm90(source, tmp_path):
    flags, kernels = CUDA_SOURCES[source]
    obj = tmp_path / (source + ".o")
    cmd = [
        find_nvcc(),
        "-c",
        str(CUDA_SRC_DIR / source),
        "-o",
        str(obj),
        f"-I{CUDA_SRC_DIR}",
        *TORCH_INCLUDES,
        "-std=c++17",
        *flags,  # the flags wkv() / wkv7() build it with
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-Xptxas=-v",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert obj.stat().st_size > 0
    # ptxas reports every kernel it built, per architecture: forward and backward per I/O dtype.
    for arch in ("sm_80", "sm_90"):
        built = [ln for ln in proc.stderr.splitlines() if "Compiling entry function" in ln and arch in ln]
        assert len(built) == kernels, proc.stderr
    # No kernel keeps a per-thread array or spills registers: the driver would reserve that local memory
    # for every resident thread (GiBs at long T, outside PyTorch's allocator). ptxas reports each
    # kernel's stack frame.
    frames = [ln.strip() for ln in proc.stderr.splitlines() if "bytes stack frame" in ln]
    assert len(frames) == 2 * kernels, proc.stderr
    assert all(ln.startswith("0 bytes stack frame, 0 bytes spill stores") for ln in frames), proc.stderr


@pytest.mark.slow  # parses torch's extension headers: ~15 s of CPU
@pytest.mark.skipif(cuda_include_dir() is None, reason="CUDA runtime headers not found (no CUDA toolkit)")
@pytest.mark.skipif(cxx_missing() is not None, reason=str(cxx_missing()))
@pytest.mark.parametrize("binding", BINDINGS)
def test_cuda_binding_compiles_against_torch_headers(binding):
    """The bindings need only torch's headers and the CUDA runtime's, so a CPU build of torch checks them."""
    cmd = [
        os.environ.get("CXX", "c++"),
        "-fsyntax-only",
        "-std=c++17",
        "-Wno-c++20-extensions",
        "-DTORCH_EXTENSION_NAME=wkv_cuda_check",
        f"-I{CUDA_SRC_DIR}",
        *TORCH_INCLUDES,
        f"-I{cuda_include_dir()}",
        f"-I{sysconfig.get_paths()['include']}",
        str(CUDA_SRC_DIR / binding),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr


REPO = Path(__file__).resolve().parents[1]
BROKEN_SOURCE = "#error wkv-build-marker: this source is broken on purpose\n"


@pytest.mark.skipif(cxx_missing() is not None, reason=str(cxx_missing()))
def test_failed_build_carries_the_compiler_message(tmp_path):
    src = tmp_path / "broken.cpp"
    src.write_text(BROKEN_SOURCE)
    with pytest.raises(WKVBuildError) as info:
        build_extension("wkv_broken_for_test", [src], build_dir=tmp_path / "build")
    message = str(info.value)
    assert "wkv-build-marker: this source is broken on purpose" in message
    assert "broken.cpp" in message


@pytest.mark.skipif(cxx_missing() is not None, reason=str(cxx_missing()))
def test_failed_build_raises_for_explicit_backend_and_warns_under_auto(tmp_path, monkeypatch):
    """A broken CPU twin: backend='cpu' raises with the compiler output; 'auto' warns, uses the reference."""
    broken_dir = tmp_path / "cuda"
    broken_dir.mkdir()
    (broken_dir / "wkv4_cpu.cpp").write_text(BROKEN_SOURCE)
    monkeypatch.setattr(wkv_mod, "CUDA_SRC_DIR", broken_dir)
    build_dir = tmp_path / "build"  # a build directory of its own: also a cache key of its own

    g = torch.Generator().manual_seed(0)
    d, u = torch.randn(8, generator=g), torch.randn(8, generator=g)
    k, v = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    with pytest.raises(WKVBuildError, match="wkv-build-marker"):
        wkv(d, u, k, v, backend="cpu", build_dir=build_dir)
    with pytest.warns(RuntimeWarning, match="wkv-build-marker"):
        y = wkv(d, u, k, v, backend="auto", build_dir=build_dir)
    assert torch.equal(y, wkv_reference(d, u, k, v))


@pytest.mark.skipif(cxx_missing() is not None, reason=str(cxx_missing()))
def test_build_dir_from_environment(tmp_path, monkeypatch):
    """RWKV_WKV_BUILD_DIR places the ninja build there (seen here through a failing build's files)."""
    monkeypatch.setenv(wkv_mod.BUILD_DIR_ENV, str(tmp_path))
    src = tmp_path / "broken.cpp"
    src.write_text(BROKEN_SOURCE)
    with pytest.raises(WKVBuildError):
        build_extension("wkv_env_dir_test", [src])
    built = list(tmp_path.glob("wkv_env_dir_test_*/build.ninja"))
    assert len(built) == 1, list(tmp_path.iterdir())
    assert (built[0].parent / "build.log").read_text().count("wkv-build-marker") >= 1  # the log is kept


GOOD_SOURCE = """
#include <torch/extension.h>
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""


def test_build_directory_is_keyed_by_what_the_binary_depends_on(tmp_path, monkeypatch):
    """Same sources and flags: same directory; other flags, sources or CUDA arch list: another one."""
    src = tmp_path / "x.cpp"
    src.write_text(GOOD_SOURCE)
    key = ext_build.build_key("x", [src], ["-O2"], [CUDA_SRC_DIR])
    assert key == ext_build.build_key("x", [src], ["-O2"], [CUDA_SRC_DIR])
    assert key != ext_build.build_key("x", [src], ["-O3"], [CUDA_SRC_DIR])
    cu = tmp_path / "x.cu"
    cu.write_text("// kernel")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    k80 = ext_build.build_key("x", [src, cu], [], [])
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert ext_build.build_key("x", [src, cu], [], []) != k80
    src.write_text(GOOD_SOURCE + "// changed\n")
    assert ext_build.build_key("x", [src], ["-O2"], [CUDA_SRC_DIR]) != key


def test_stale_torch_lock_of_a_killed_build_is_removed(tmp_path):
    """A build killed mid-way leaves torch's lock file; the next build says so and goes on (no hang)."""
    src = tmp_path / "answer.cpp"
    src.write_text(GOOD_SOURCE)
    key = ext_build.build_key("answer_ext", [src], ["|", "|"], [CUDA_SRC_DIR])
    directory = tmp_path / "build" / f"answer_ext_{key}"
    directory.mkdir(parents=True)
    (directory / ext_build.TORCH_LOCK_NAME).write_text("")  # what a SIGKILLed torch build leaves behind
    code = (
        "import sys; sys.path.insert(0, {!r})\n"
        "from train import ext_build\n"
        "m = ext_build.build_extension('answer_ext', [{!r}], build_dir={!r}, include_dirs=[{!r}])\n"
        "print('answer', m.answer())\n"
    ).format(str(REPO), str(src), str(tmp_path / "build"), str(CUDA_SRC_DIR))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    messages = proc.stdout + proc.stderr
    assert proc.returncode == 0, messages
    assert "answer 42" in messages
    assert f"removing {directory / ext_build.TORCH_LOCK_NAME}" in messages


def test_concurrent_ranks_build_once(tmp_path):
    """Four processes asking for the same extension at once: one compiles, the others load its result."""
    src = tmp_path / "answer.cpp"
    src.write_text(GOOD_SOURCE)
    code = (
        "import sys; sys.path.insert(0, {!r})\n"
        "from train import ext_build\n"
        "m = ext_build.build_extension('answer_ext', [{!r}], build_dir={!r})\n"
        "print('answer', m.answer())\n"
    ).format(str(REPO), str(src), str(tmp_path / "build"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all("answer 42" in o for o in outs), outs
    # ninja logs every command it runs: one compile and one link in all, whoever ran them
    (log,) = (tmp_path / "build").glob("answer_ext_*/.ninja_log")
    commands = [ln for ln in log.read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(commands) == 2, commands


HOST_PROGRAM = r"""
// Plain C++ use of the kernel header, no torch: read T C, then w u (C each), then k v (T*C each);
// print y (T*C) and the final state.
#include <cstdio>
#include <vector>
#include "wkv4_math.h"
int main() {
    int T, C;
    if (std::scanf("%d %d", &T, &C) != 2) return 1;
    std::vector<double> w(C), u(C), k(T * C), v(T * C), y(T * C), state(3 * C);
    for (auto *vec : {&w, &u, &k, &v})
        for (double &x : *vec) std::scanf("%lf", &x);
    for (int c = 0; c < C; c++) state[2 * C + c] = WKV_MIN_EXP;
    for (int c = 0; c < C; c++)
        wkv_math::forward_lanes<1, double, double>(T, C, &w[c], &u[c], &k[c], &v[c], &y[c], &state[c], C);
    for (double x : y) std::printf("%.17g\n", x);
}
"""


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no host C++ compiler")
def test_header_builds_and_runs_with_plain_cxx(tmp_path):
    """wkv4_math.h needs neither nvcc nor torch: a plain C++ program gives the reference's numbers."""
    src, exe = tmp_path / "host.cpp", tmp_path / "host"
    src.write_text(HOST_PROGRAM)
    cc = subprocess.run(
        [
            os.environ.get("CXX", "c++"),
            "-std=c++17",
            "-O2",
            "-Wall",
            "-Werror",
            f"-I{CUDA_SRC_DIR}",
            str(src),
            "-o",
            str(exe),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cc.returncode == 0, cc.stderr
    g = torch.Generator().manual_seed(0)
    T, C = 7, 3
    d, u = torch.randn(C, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)
    k = torch.randn(1, T, C, generator=g, dtype=torch.float64) * 20
    v = torch.randn(1, T, C, generator=g, dtype=torch.float64)
    numbers = [T, C, *(-torch.exp(d)).tolist(), *u.tolist(), *k.flatten().tolist(), *v.flatten().tolist()]
    run = subprocess.run(
        [str(exe)], input=" ".join(map(repr, numbers)), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    y = torch.tensor([float(x) for x in run.stdout.split()], dtype=torch.float64).reshape(1, T, C)
    torch.testing.assert_close(y, wkv_reference(d, u, k, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "given, expected",
    [("9.0a", "9.0"), ("8.0;9.0a+PTX", "8.0;9.0+PTX"), ("9.0a 9.0", "9.0"), ("8.6+PTX", "8.6+PTX"), ("", "")],
)
def test_arch_list_is_made_readable_for_deepspeed(monkeypatch, given, expected):
    """An image exporting TORCH_CUDA_ARCH_LIST=9.0a killed every GPU run in DeepSpeed's FusedAdam build."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", given)
    ext_build.arch_list_for_deepspeed(log=lambda msg: None)
    value = os.environ["TORCH_CUDA_ARCH_LIST"]
    assert value == expected
    # DeepSpeed's op builder (ops/op_builder/builder.py) sorts the entries by this key:
    for cc in filter(None, value.split(";")):
        tuple(int(part.split("+")[0]) for part in cc.split("."))


HOST_PROGRAM_WKV7 = r"""
// Plain C++ use of the WKV-7 header, no torch, head size 4: read T, then r w k v a b (T*4 each, step-major)
// and the initial state (4*4, [value i, key j]); print y (T*4) and the final state.
#include <cstdio>
#include <vector>
#include "wkv7_math.h"
constexpr int N = 4;
int main() {
    int T;
    if (std::scanf("%d", &T) != 1) return 1;
    std::vector<double> r(T * N), w(T * N), k(T * N), v(T * N), a(T * N), b(T * N), s(N * N);
    for (auto *vec : {&r, &w, &k, &v, &a, &b, &s})
        for (double &x : *vec) std::scanf("%lf", &x);
    for (int t = 0; t < T; t++) {
        double d[N];
        for (int j = 0; j < N; j++) d[j] = wkv7_math::decay(w[t * N + j]);
        double y[N], sa;
        for (int i = 0; i < N; i++)
            y[i] = wkv7_math::forward_row<N, double>(&s[i * N], &r[t * N], d, &k[t * N], &a[t * N], &b[t * N],
                                                     v[t * N + i], sa);
        for (double x : y) std::printf("%.17g\n", x);
    }
    for (double x : s) std::printf("%.17g\n", x);
}
"""


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no host C++ compiler")
def test_wkv7_header_builds_and_runs_with_plain_cxx(tmp_path):
    """wkv7_math.h needs neither nvcc nor torch: a plain C++ program (head size 4) gives the reference's
    y and final state."""
    src, exe = tmp_path / "host7.cpp", tmp_path / "host7"
    src.write_text(HOST_PROGRAM_WKV7)
    cxx = os.environ.get("CXX", "c++")
    cc = subprocess.run(
        [cxx, "-std=c++17", "-O2", "-Wall", "-Werror", f"-I{CUDA_SRC_DIR}", str(src), "-o", str(exe)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cc.returncode == 0, cc.stderr
    g = torch.Generator().manual_seed(0)
    T, N = 9, 4
    r, k, v, a, b = (torch.randn(1, T, 1, N, generator=g, dtype=torch.float64) for _ in range(5))
    w = -torch.nn.functional.softplus(-torch.randn(1, T, 1, N, generator=g, dtype=torch.float64)) - 0.5
    s0 = torch.randn(1, 1, N, N, generator=g, dtype=torch.float64)
    numbers = [T, *(x.flatten().tolist() for x in (r, w, k, v, a, b, s0))]
    flat = [numbers[0], *(x for xs in numbers[1:] for x in xs)]
    run = subprocess.run(
        [str(exe)], input=" ".join(map(repr, flat)), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    out = torch.tensor([float(x) for x in run.stdout.split()], dtype=torch.float64)
    y_ref, s_ref = wkv7_mod.wkv7_reference(r, w, k, v, a, b, state=s0)
    torch.testing.assert_close(out[: T * N].reshape(1, T, 1, N), y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[T * N :].reshape(1, 1, N, N), s_ref, rtol=1e-12, atol=1e-12)


HOST_PROGRAM_WKV6 = r"""
// Plain C++ use of the WKV-6 header, no torch, head size 4: read T, then r w k v (T*4 each, step-major),
// u (4) and the initial state (4*4, [key i, value j]); print y (T*4) and the final state.
#include <cstdio>
#include <vector>
#include "wkv6_math.h"
constexpr int N = 4;
int main() {
    int T;
    if (std::scanf("%d", &T) != 1) return 1;
    std::vector<double> r(T * N), w(T * N), k(T * N), v(T * N), u(N), s(N * N);
    for (auto *vec : {&r, &w, &k, &v, &u, &s})
        for (double &x : *vec) std::scanf("%lf", &x);
    double cols[N][N];  // cols[j][i] = S[i, j]: column worker j's column
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) cols[j][i] = s[i * N + j];
    for (int t = 0; t < T; t++) {
        double d[N];
        for (int i = 0; i < N; i++) d[i] = wkv6_math::decay(w[t * N + i]);
        for (int j = 0; j < N; j++) {
            const double y = wkv6_math::forward_col<N, double>(cols[j], &r[t * N], u.data(), &k[t * N], d,
                                                               v[t * N + j]);
            std::printf("%.17g\n", y);
        }
    }
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) std::printf("%.17g\n", cols[j][i]);
}
"""


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no host C++ compiler")
def test_wkv6_header_builds_and_runs_with_plain_cxx(tmp_path):
    """wkv6_math.h needs neither nvcc nor torch: a plain C++ program (head size 4) gives the reference's
    y and final state."""
    src, exe = tmp_path / "host6.cpp", tmp_path / "host6"
    src.write_text(HOST_PROGRAM_WKV6)
    cxx = os.environ.get("CXX", "c++")
    cc = subprocess.run(
        [cxx, "-std=c++17", "-O2", "-Wall", "-Werror", f"-I{CUDA_SRC_DIR}", str(src), "-o", str(exe)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cc.returncode == 0, cc.stderr
    g = torch.Generator().manual_seed(0)
    T, N = 9, 4
    r, k, v = (torch.randn(1, T, 1, N, generator=g, dtype=torch.float64) for _ in range(3))
    w = torch.randn(1, T, 1, N, generator=g, dtype=torch.float64) * 2
    u = torch.randn(1, N, generator=g, dtype=torch.float64)
    s0 = torch.randn(1, 1, N, N, generator=g, dtype=torch.float64)
    flat = [T, *(x for t in (r, w, k, v, u, s0) for x in t.flatten().tolist())]
    run = subprocess.run(
        [str(exe)], input=" ".join(map(repr, flat)), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    out = torch.tensor([float(x) for x in run.stdout.split()], dtype=torch.float64)
    y_ref, s_ref = wkv6_mod.wkv6_reference(r, w, k, v, u, state=s0)
    torch.testing.assert_close(out[: T * N].reshape(1, T, 1, N), y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[T * N :].reshape(1, 1, N, N), s_ref, rtol=1e-12, atol=1e-12)
