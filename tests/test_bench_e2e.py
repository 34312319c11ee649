"""benchmarks/bench_e2e.py's matmul floor in one child run of our variant at a small batch: the projection GEMMs
match a profiled step's, and on the CPU the attention kernels' own block products are recorded in a real step and
timed alone beside them (the floor with the attention)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_matmul_floor_with_the_attention_products():
    B, T, d, H, layers = 1, 16, 64, 9, 30  # the SmolLM2-135M shape, every layer adapted
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_e2e.py"), "--variant",
                          "lladapter kernels", "--batch", str(B), "--seq", str(T), "--iters", "1", "--decode-new", "0"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    row = json.loads(run.stdout.strip().splitlines()[-1])
    assert row["gemm_check"] == "same shapes"
    assert row["attention_products"] > 0 and row["attention_products_s"] > 0
    # every layer's forward (scores, probabilities x values) and backward (scores, dP, dv, dk, dq): at least seven
    # products over the causal triangle of each (batch row, head)
    assert row["attention_products_flop"] >= layers * 7 * 2 * d * B * H * T * (T + 1) // 2
    # the same pairs' step over a larger floor
    assert row["step_vs_matmul_floor_with_attention"] < row["step_vs_matmul_floor"]
