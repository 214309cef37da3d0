"""Building the WKV kernels: nvcc compiles the CUDA sources for sm_80 and sm_90 without a GPU, the CUDA
binding compiles against torch's headers, and a failed build reports the compiler's own message."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import train.wkv as wkv_mod
from train.wkv import CUDA_CFLAGS, CUDA_SRC_DIR, WKVBuildError, build_extension, wkv, wkv_reference


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


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found (no CUDA toolkit on this machine)")
@pytest.mark.parametrize("source", sorted(p.name for p in CUDA_SRC_DIR.glob("*.cu")))
def test_nvcc_compiles_kernel_for_sm80_and_sm90(source, tmp_path):
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
        *CUDA_CFLAGS,  # the flags wkv() builds with
        "-DWKV_T_MAX=1024",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-Xptxas=-v",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert obj.stat().st_size > 0
    # ptxas reports every kernel it built, per architecture: both kernels, fp32 and bf16, for both targets.
    for arch in ("sm_80", "sm_90"):
        built = [ln for ln in proc.stderr.splitlines() if "Compiling entry function" in ln and arch in ln]
        assert len(built) == 4, proc.stderr


@pytest.mark.slow  # parses torch's extension headers: ~15 s of CPU
@pytest.mark.skipif(cuda_include_dir() is None, reason="CUDA runtime headers not found (no CUDA toolkit)")
def test_cuda_binding_compiles_against_torch_headers():
    """wkv_op.cpp needs only torch's headers and the CUDA runtime's, so a CPU build of torch can check it."""
    cmd = [
        os.environ.get("CXX", "c++"),
        "-fsyntax-only",
        "-std=c++17",
        "-Wno-c++20-extensions",
        "-DTORCH_EXTENSION_NAME=wkv_cuda_check",
        "-DWKV_T_MAX=1024",
        f"-I{CUDA_SRC_DIR}",
        *TORCH_INCLUDES,
        f"-I{cuda_include_dir()}",
        f"-I{sysconfig.get_paths()['include']}",
        str(CUDA_SRC_DIR / "wkv_op.cpp"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr


BROKEN_SOURCE = "#error wkv-build-marker: this source is broken on purpose\n"


def test_failed_build_carries_the_compiler_message(tmp_path):
    src = tmp_path / "broken.cpp"
    src.write_text(BROKEN_SOURCE)
    with pytest.raises(WKVBuildError) as info:
        build_extension("wkv_broken_for_test", [src], build_dir=tmp_path / "build")
    message = str(info.value)
    assert "wkv-build-marker: this source is broken on purpose" in message
    assert "broken.cpp" in message


def test_failed_build_raises_for_explicit_backend_and_warns_under_auto(tmp_path, monkeypatch):
    """A broken CPU twin: backend='cpu' raises with the compiler output; 'auto' warns, uses the reference."""
    broken_dir = tmp_path / "cuda"
    broken_dir.mkdir()
    (broken_dir / "wkv_cpu.cpp").write_text(BROKEN_SOURCE)
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


def test_build_dir_from_environment(tmp_path, monkeypatch):
    """RWKV_WKV_BUILD_DIR places the ninja build there (seen here through a failing build's files)."""
    monkeypatch.setenv(wkv_mod.BUILD_DIR_ENV, str(tmp_path))
    src = tmp_path / "broken.cpp"
    src.write_text(BROKEN_SOURCE)
    with pytest.raises(WKVBuildError):
        build_extension("wkv_env_dir_test", [src])
    assert (tmp_path / "wkv_env_dir_test" / "build.ninja").exists()
