"""Self-tests of the CUDA emulator (csrc/emu, docs/emulator.md): every check fires on a deliberately broken kernel
with a message naming kernel, block, thread and the check, and correct kernels run. Skipped where the emulator is
not built (no CUDA toolkit headers at build time); `make test` requires it wherever CUDA_HOME is set.
"""
import math
import struct

import pytest
import torch

from lladapter_ext import emulator

if not emulator.available():
    pytest.skip("lladapter_ext._emu is not built (the CPU emulator of the CUDA kernels)", allow_module_level=True)

from lladapter_ext import _emu as emu  # noqa: E402

pytestmark = pytest.mark.emu

DEFAULTS = dict(schedule="inorder", seed=0, layout="sm80", layout_seed=0, workers=0, stack_kib=128, timeout_s=300.0)


@pytest.fixture(autouse=True)
def _emu_defaults():
    """Every test starts from the default knobs and the sm90 profile, and leaves them so."""
    emu.configure(**DEFAULTS)
    emu.set_device_profile("sm90")
    yield
    emu.configure(**DEFAULTS)
    emu.set_device_profile("sm90")


def bits(values):
    """Bitwise identity of a list of floats (NaN payloads included)."""
    return struct.pack(f"{len(values)}d", *values)


# ------------------------------------------------------------------------------------------------ correct kernels
@pytest.mark.parametrize("name", ["warp_ops", "block_2d", "block_1024", "exited_barrier", "partial_warp",
                                  "global_read_ok", "dyn_smem_with_attr"])
@pytest.mark.parametrize("schedule", ["inorder", "reverse", "random"])
def test_correct_kernels_run(name, schedule):
    emu.configure(schedule=schedule, seed=7)
    emu.selftest(name)  # each checks its own results in C++ and raises on a mismatch


@pytest.mark.parametrize("workers", [1, 2])
def test_many_blocks_over_workers(workers):
    emu.configure(workers=workers)
    seen = set()
    for _ in range(5):  # a busy machine may not wake the second worker before the first has run every block
        r = emu.selftest("many_blocks")
        assert len(r["out"]) == 2048
        seen.add(int(r["os_threads"][0]))
        if workers in seen:
            break
    assert workers in seen and max(seen) <= workers, seen


def test_shared_memory_reads_nan_before_written():
    out = emu.selftest("smem_nan")["out"]
    assert len(out) == 256 and all(math.isnan(v) for v in out)  # static fp32/fp16, dynamic fp32/bf16


def test_missing_barrier_changes_results_across_schedules():
    runs = {}
    for schedule, seed in [("inorder", 0), ("reverse", 0), ("random", 1), ("random", 2), ("random", 3)]:
        emu.configure(schedule=schedule, seed=seed)
        runs[(schedule, seed)] = bits(emu.selftest("race_missing_barrier")["out"])
    assert len(set(runs.values())) > 1, "a missing __syncthreads must show as schedule-dependent output"
    emu.configure(schedule="random", seed=1)
    a = bits(emu.selftest("race_missing_barrier")["out"])
    assert a == runs[("random", 1)], "the same seed must reproduce the same schedule"


def test_correct_barrier_is_schedule_independent():
    runs = set()
    for schedule, seed in [("inorder", 0), ("reverse", 0), ("random", 1), ("random", 2), ("random", 3)]:
        emu.configure(schedule=schedule, seed=seed)
        out = emu.selftest("race_with_barrier")["out"]
        assert not any(math.isnan(v) for v in out)
        runs.add(bits(out))
    assert len(runs) == 1


@pytest.mark.parametrize("name", ["wmma_gemm_half", "wmma_gemm_half_bcol", "wmma_gemm_bf16", "wmma_gemm_bf16_bcol"])
def test_wmma_gemm_matches_reference_under_both_layouts(name):
    results = {}
    for layout, seed in [("sm80", 0), ("scrambled", 1), ("scrambled", 2)]:
        emu.configure(layout=layout, layout_seed=seed)
        r = emu.selftest(name)
        results[(layout, seed)] = bits(r["out"])
        ref = torch.tensor(r["ref"], dtype=torch.float64)
        out = torch.tensor(r["out"], dtype=torch.float64)
        # fp32 accumulation in k order of exact products: equal to the k-ordered fp32 reference
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    assert len(set(results.values())) == 1, "an API-only wmma kernel must not depend on the fragment layout"


def test_wmma_gemm_matches_float32_matmul():
    r = emu.selftest("wmma_gemm_half")
    out = torch.tensor(r["out"]).reshape(64, 64)
    ref = torch.tensor(r["ref"]).reshape(64, 64)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)


def test_wmma_layout_dependent_code_is_caught_by_scrambled_layout():
    emu.configure(layout="sm80")
    r = emu.selftest("wmma_layout_probe")
    assert r["out"] == pytest.approx(r["expected_if_sm80"], rel=1e-3)
    emu.configure(layout="scrambled", layout_seed=1)
    r2 = emu.selftest("wmma_layout_probe")
    assert r2["out"] != pytest.approx(r["expected_if_sm80"], rel=1e-3)


def test_wmma_element_position_sm80():
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(8):
            row, col = g + 8 * ((i >> 1) & 1), 2 * t + (i & 1) + 8 * ((i >> 2) & 1)
            assert emu.wmma_element_position(0, lane, i) == (row, col)
            row, col = 2 * t + (i & 1) + 8 * ((i >> 1) & 1), g + 8 * ((i >> 2) & 1)
            assert emu.wmma_element_position(1, lane, i) == (row, col)
            assert emu.wmma_element_position(0, lane, i + 8) == emu.wmma_element_position(0, lane, i)
    emu.configure(layout="scrambled", layout_seed=5)
    seen = {emu.wmma_element_position(2, lane, i) for lane in range(32) for i in range(8)}
    assert len(seen) == 256  # still a permutation of the tile


def test_wmma_padded_ldm_warns():
    emu.clear_warnings()
    emu.selftest("wmma_gemm_half")  # A is read from shared memory with ldm 72 (144 bytes)
    w = emu.warnings()
    assert any("ldm 72" in m and "PTX" in m for m in w), w


# ------------------------------------------------------------------------------------------------ broken kernels
BROKEN = {
    # name: substrings of the error message
    "deadlock_barrier": ["[deadlock]", "st_deadlock_barrier", "block (0,0,0)", "__syncthreads at", "48 thread(s): 0-47",
                         "__syncwarp (mask 0xffffffff) at", "16 thread(s): 48-63"],
    "barrier_sites": ["[barrier-divergence]", "st_barrier_sites", "thread (32,0,0)", "different call sites",
                      "selftest_kernels.cpp:"],
    "shfl_exited_lane": ["[exited-lane]", "thread (31,0,0)", "__shfl_xor_sync", "lanes 0-30"],
    "syncwarp_exited_lane": ["[exited-lane]", "thread (31,0,0)", "__syncwarp"],
    "mask_without_caller": ["[warp-mask]", "thread (0,0,0)", "mask 0xfffffffe", "does not contain the calling lane 0"],
    "different_collectives": ["[warp-divergence]", "different collectives", "__syncwarp", "__shfl_xor_sync",
                              "lanes 0-15"],
    "warp_deadlock": ["[deadlock]", "__syncwarp (mask 0xffffffff)", "16 thread(s): 0-15", "__syncthreads at",
                      "16 thread(s): 16-31"],
    "shfl_src_outside_mask": ["[warp-mask]", "lane 0 reads lane 16", "not in the mask 0x0000ffff"],
    "partial_warp_full_mask": ["[warp-mask]", "thread (32,0,0)", "lane(s) 8-31", "do not exist"],
    "smem_oob_static": ["[shared-oob]", "'small'", "past the end", "detected at __syncthreads"],
    "smem_oob_dynamic": ["[shared-oob]", "thread (1,0,0)", "96 bytes past the end of the 4000-byte dynamic shared"],
    "smem_oob_dynamic_slack": ["[shared-oob]", "past the end of the dynamic shared memory (1000 bytes)"],
    "global_oob_read": ["[global-oob]", "st_global_read", "thread (31,0,0)", "invalid read",
                        "12 bytes past the end of a 4096-byte guarded allocation"],
    "global_oob_write": ["[global-oob]", "st_global_write", "thread (31,0,0)", "invalid write",
                         "12 bytes past the end of a 4096-byte guarded allocation"],
    "global_oob_write_slack": ["[global-oob]", "st_global_write", "4092-byte guarded allocation", "slack"],
    "too_many_threads": ["[launch-config]", "block (2048,1,1)", "exceeds the limit 1024"],
    "too_many_threads_2d": ["[launch-config]", "block (64,32,1) has 2048 threads", "limit of 1024"],
    "block_dim_z_over": ["[launch-config]", "dimension z = 65 exceeds the limit 64"],
    "grid_over": ["[launch-config]", "grid (1,65536,1)", "exceeds the limit 65535"],
    "zero_grid": ["[launch-config]", "grid (0,1,1) has a zero dimension"],
    "dyn_smem_no_attr": ["[smem-attr]", "65536 bytes of dynamic shared memory", "cudaFuncSetAttribute"],
    "dyn_smem_over_optin": ["[smem-limit]", "opt-in limit of profile sm90", "232448"],
    "dyn_smem_attr_over_optin": ["[smem-attr]", "232448"],
    "static_smem_over": ["[smem-limit]", "'big'", "49152-byte static limit"],
    "wmma_misaligned": ["[wmma-align]", "load_matrix_sync", "not 256-bit (32-byte) aligned"],
    "wmma_bad_ldm": ["[wmma-ldm]", "ldm 20", "40 bytes", "not a multiple of 16 bytes"],
    "wmma_lanes_disagree": ["[wmma-args]", "different arguments", "lane 16"],
    "kernel_assert": ["[kernel-assert]", "st_kernel_assert", "block (1,0,0)", "thread (5,0,0)",
                      "negative value"],
    "plain_assert": ["[kernel-assert]", "st_plain_assert", "thread (9,0,0)", "data[threadIdx.x] >= 0"],
    "stack_overflow": ["[stack-overflow]", "st_stack_overflow", "fiber stack", "stack_kib"],
    "null_deref": ["[fault]", "null pointer", "thread (0,0,0)"],
    "int_div_zero": ["[fault]", "SIGFPE", "division by zero", "thread (7,0,0)"],
    "kernel_throws": ["[exception]", "thread (3,0,0)", "selftest exception from kernel code"],
    "nested_launch": ["[launch-config]", "st_nested_launch", "thread (0,0,0)", "dynamic parallelism"],
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_kernel_raises(name):
    with pytest.raises(RuntimeError) as ei:
        emu.selftest(name)
    msg = str(ei.value)
    assert msg.startswith("llemu: ["), msg
    for part in BROKEN[name]:
        assert part in msg, f"{part!r} not in: {msg}"
    emu.selftest("warp_ops")  # the emulator keeps working after an error


def test_every_selftest_is_covered():
    names = set(emu.selftest_names())
    positive = {"warp_ops", "block_2d", "block_1024", "exited_barrier", "partial_warp", "global_read_ok",
                "dyn_smem_with_attr", "many_blocks", "smem_nan", "race_missing_barrier", "race_with_barrier",
                "wmma_gemm_half", "wmma_gemm_half_bcol", "wmma_gemm_bf16", "wmma_gemm_bf16_bcol", "wmma_layout_probe",
                "bench", "endless_loop"}
    assert names == positive | set(BROKEN), names ^ (positive | set(BROKEN))


@pytest.mark.parametrize("name", ["deadlock_barrier", "shfl_exited_lane", "global_oob_read", "stack_overflow",
                                  "kernel_assert"])
def test_errors_under_every_schedule_and_two_workers(name):
    for schedule in ["reverse", "random"]:
        emu.configure(schedule=schedule, seed=3, workers=2)
        with pytest.raises(RuntimeError, match=r"^llemu: \["):
            emu.selftest(name)


@pytest.mark.parametrize("workers", [1, 2])
def test_endless_loop_ends_at_the_timeout(workers):
    emu.configure(timeout_s=0.5, workers=workers)
    with pytest.raises(RuntimeError) as ei:
        emu.selftest("endless_loop")
    msg = str(ei.value)
    for part in ["[timeout]", "st_endless_loop", "thread (0,0,0)", "0.5 s", "busy-wait"]:
        assert part in msg, msg
    emu.selftest("warp_ops")


def test_stack_size_knob():
    emu.configure(stack_kib=512)
    assert emu.config()["stack_kib"] == 512
    with pytest.raises(RuntimeError, match="512 KiB fiber stack"):
        emu.selftest("stack_overflow")
    emu.selftest("block_1024")
    emu.configure(stack_kib=16)  # the smallest: the kernels' frames and an error path still fit
    emu.selftest("block_1024")
    emu.selftest("warp_ops")
    with pytest.raises(RuntimeError, match=r"\[kernel-assert\]"):
        emu.selftest("kernel_assert")


# ---------------------------------------------------------------------------------------------- profiles, knobs, stats
def test_device_profiles():
    p = emu.set_device_profile("sm80")
    assert (p["major"], p["sm_count"], p["smem_optin_limit"], p["static_smem_limit"]) == (8, 108, 166912, 49152)
    with pytest.raises(RuntimeError, match="opt-in limit of profile sm80"):
        emu.selftest("dyn_smem_over_optin")
    p = emu.set_device_profile("sm90", sm_count=7)
    assert (p["major"], p["sm_count"], p["smem_optin_limit"]) == (9, 7, 232448)
    assert emu.device_profile()["sm_count"] == 7
    assert emu.device_profile()["max_grid_dim"] == (2**31 - 1, 65535, 65535)
    with pytest.raises(ValueError):
        emu.set_device_profile("sm75")


def test_config_roundtrip_and_validation():
    c = emu.configure(schedule="random", seed=42, layout="scrambled", layout_seed=9, workers=1, stack_kib=256,
                      timeout_s=60)
    assert c == dict(schedule="random", seed=42, layout="scrambled", layout_seed=9, workers=1, stack_kib=256,
                     timeout_s=60.0)
    assert emu.config() == c
    assert emu.configure(seed=43)["schedule"] == "random"  # None keeps a value
    with pytest.raises(ValueError):
        emu.configure(schedule="sideways")
    with pytest.raises(ValueError):
        emu.configure(layout="sm70")
    with pytest.raises(ValueError):
        emu.configure(stack_kib=1)
    with pytest.raises(ValueError):
        emu.configure(timeout_s=-1)


def test_stats_and_kernel_registry():
    emu.reset_stats()
    emu.selftest("block_2d")
    k = emu.launched_kernels()
    assert set(k) == {"st_block2d"}
    rec = k["st_block2d"]
    assert (rec["launches"], rec["blocks"], rec["threads"]) == (1, 6, 768)
    assert len(rec["sites"]) == 1 and "selftest_kernels.cpp:" in rec["sites"][0]
    assert rec["instantiations"] == 1
    emu.selftest("race_missing_barrier")
    emu.selftest("race_with_barrier")
    rec = emu.launched_kernels()
    assert rec["st_race<false>"]["instantiations"] == 1 and rec["st_race<true>"]["launches"] == 1
    s = emu.stats()
    assert s["launches"] == 3 and s["blocks"] == 6 + 8 and s["fibers"] == 768 + 1024
    assert s["barriers"] == 6 + 8 + 4 and s["warp_collectives"] == 768 and s["context_switches"] > 768 + 1024
    with pytest.raises(RuntimeError):
        emu.selftest("zero_grid")
    assert emu.stats()["errors"] == 1
    emu.reset_stats()
    assert emu.launched_kernels() == {} and emu.stats()["launches"] == 0


def test_costs(capsys):
    r = emu.selftest("bench")
    with capsys.disabled():
        print("\nllemu costs here: " + ", ".join(f"{k} {v[0]:.1f}" for k, v in sorted(r.items())))
    # generous bounds: a regression to ucontext-like switches or per-switch allocation would break them
    assert r["ns_per_switch"][0] < 1000
    assert r["ns_per_barrier_128_threads"][0] < 200_000


# ------------------------------------------------------------------------------------------------ guarded allocator
def test_guarded_cpu_allocator():
    assert emu.guarded_allocator_enabled() is False
    before = emu.guarded_live_allocations()
    assert emu.guarded_allocator(True) is False
    try:
        x = torch.empty(1000, dtype=torch.float32)
        assert torch.isnan(x).all()  # fresh memory is 0xFF
        assert x.data_ptr() % 16 == 0
        assert emu.guarded_live_allocations() >= before + 1
        y = (x.nan_to_num(0.0) + 1).sum()
        assert y.item() == 1000.0
        z = torch.empty(0)
        assert z.numel() == 0
    finally:
        assert emu.guarded_allocator(False) is True
    w = torch.empty(10)  # the previous allocator again
    del x, y, z
    assert emu.guarded_live_allocations() == before  # freed correctly after disabling
    assert emu.guarded_errors() == []
    assert w.numel() == 10
