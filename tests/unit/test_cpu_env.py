"""LD_PRELOAD for CPU engines: the libraries are found, composed without clobbering, and really get mapped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lightning_ray.config import InferenceConfig
from lightning_ray.inference.cpu_env import (
    PRELOADS,
    compose_ld_preload,
    cpu_preload_env,
    engine_env,
    find_iomp,
    find_tcmalloc,
    preload_libs,
    preload_report,
)

TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
IOMP = Path("/env/lib/libiomp5.so")


def test_both_libraries_are_found_where_install_sh_puts_them():
    found, missing = preload_libs(PRELOADS)
    assert missing == [], "run ./install.sh (tcmalloc: Debian's libtcmalloc-minimal4; iomp: intel-openmp)"
    assert found["tcmalloc"] == find_tcmalloc() and found["tcmalloc"].name.startswith("libtcmalloc")
    assert found["iomp"] == find_iomp() and found["iomp"].name == "libiomp5.so"
    assert all(p.is_file() for p in found.values())


def test_tcmalloc_search_prefers_the_minimal_build_and_the_first_folder(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for d, name in [(first, "libtcmalloc.so.4"), (second, "libtcmalloc_minimal.so.4")]:
        d.mkdir()
        (d / name).write_bytes(b"")
    assert find_tcmalloc([first, second]) == first / "libtcmalloc.so.4"
    (first / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert find_tcmalloc([first, second]) == first / "libtcmalloc_minimal.so.4"
    assert find_tcmalloc([tmp_path]) is None


def test_compose_puts_the_libraries_in_front_and_keeps_what_was_there():
    assert compose_ld_preload([TCMALLOC, IOMP]) == f"{TCMALLOC}:{IOMP}"
    assert compose_ld_preload([TCMALLOC, IOMP], "/opt/x/libfoo.so") == f"{TCMALLOC}:{IOMP}:/opt/x/libfoo.so"
    # LD_PRELOAD may also be separated by spaces
    assert compose_ld_preload([TCMALLOC], "/a/liba.so /b/libb.so") == f"{TCMALLOC}:/a/liba.so:/b/libb.so"


def test_compose_leaves_a_library_the_user_preloaded_alone():
    mine = "/opt/gperftools/lib/libtcmalloc_minimal.so.4"
    assert compose_ld_preload([TCMALLOC, IOMP], mine) == f"{IOMP}:{mine}"
    # only one OpenMP runtime per process: a preloaded libgomp stays, Intel OpenMP is not added
    gomp = "/torch/lib/libgomp.so.1"
    assert compose_ld_preload([TCMALLOC, IOMP], gomp) == f"{TCMALLOC}:{gomp}"
    assert compose_ld_preload([TCMALLOC, IOMP], f"{TCMALLOC}:{IOMP}") == f"{TCMALLOC}:{IOMP}"


def test_preload_env_and_its_log_line():
    found, _ = preload_libs(PRELOADS)
    env, line = cpu_preload_env(PRELOADS, {"LD_PRELOAD": "/opt/x/libfoo.so"})
    assert env["LD_PRELOAD"] == f"{found['tcmalloc']}:{found['iomp']}:/opt/x/libfoo.so"
    assert str(found["tcmalloc"]) in line and str(found["iomp"]) in line
    assert cpu_preload_env([], {}) == ({}, "vLLM CPU engine: LD_PRELOAD unchanged")
    env, line = cpu_preload_env(["iomp"], {"LD_PRELOAD": "/torch/lib/libgomp.so.1"})
    assert env == {} and "instead of iomp" in line


def test_a_process_started_with_the_composed_preload_has_both_libraries_mapped():
    env, _ = cpu_preload_env(PRELOADS, {})
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
        env={**os.environ, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout.readline() == b"up\n"
        [report] = [r for r in preload_report() if r["pid"] == child.pid]
    finally:
        child.communicate(b"")
    assert any(lib.startswith("libtcmalloc") for lib in report["libs"]), report
    assert "libiomp5.so" in report["libs"], report


def test_engine_env_on_cpu_and_on_gpu():
    cpu = engine_env(InferenceConfig(cpu_threads_bind="auto", kv_cache_gib=2))
    assert cpu["VLLM_CPU_OMP_THREADS_BIND"] == "auto" and cpu["VLLM_CPU_KVCACHE_SPACE"] == "2"
    gpu = engine_env(InferenceConfig(num_gpus_per_replica=1))
    assert not any(k.startswith(("VLLM_CPU", "LD_PRELOAD")) for k in gpu)
