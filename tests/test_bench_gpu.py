"""tools/bench_gpu.py: its FLOP count against the closed form, and its --tiny run end to end on the CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import bench_gpu  # noqa: E402  (a script in tools/, importable once tools/ is on the path)


def test_model_flops_are_the_closed_form_for_a_dit():
    """FlopCounterMode's count of one training step equals the matmul count written out by hand.

    Forward F = 2 B (N W_tok + W_img) + 4 B N^2 D depth: per-token weights (patch embedding, qkv,
    projection, MLP, output projection) act on every token, the adaLN and timestep weights once per
    image, attention is QK^T and AV. Backward computes weight and input gradients, 2 F, except the
    input gradients of the two layers fed by non-trainable inputs (patches, timestep features).
    """
    b, side, p, d, depth, heads = 3, 8, 2, 32, 2, 2
    spec = bench_gpu.Spec("dit", bench_gpu.dit(d, depth, heads, side=side, classes=10), b, (4, side, side), classes=10)
    n, patch, freq = (side // p) ** 2, 4 * p * p, 256
    per_token = patch * d + depth * (3 * d * d + d * d + 2 * 4 * d * d) + d * patch
    per_image = freq * d + d * d + depth * 6 * d * d + 2 * d * d
    forward = 2 * b * (n * per_token + per_image) + 4 * b * n * n * d * depth
    expected = 3 * forward - 2 * b * n * patch * d - 2 * b * freq * d
    assert bench_gpu.step_flops(spec, b) == expected


def test_peak_table_picks_the_specific_name_first():
    assert bench_gpu.peak_tflops(bench_gpu.torch.device("cpu"), None)[0] is None
    assert bench_gpu.peak_tflops(bench_gpu.torch.device("cpu"), 500.0) == (500.0, "--peak-tflops")
    names = list(bench_gpu.PEAK_BF16_TFLOPS)
    assert names.index("H100 PCIe") < names.index("H100") and names.index("H200 NVL") < names.index("H200")


def test_tiny_run_writes_every_row_and_both_sides_train_the_same_model(tmp_path):
    out = (tmp_path / "bench").with_suffix(".md")
    models = ["DiT-S/2 tiny", "MMDiT-XL/2 tiny"]
    configs = ["DDP + act. ckpt", "FSDP2"]  # the two strategies; compile is skipped in --tiny, and says so
    cmd = [sys.executable, str(TOOLS / "bench_gpu.py"), "--tiny", "--models", *models, "--out", str(out)]
    cmd += ["--configs", *configs, "DDP + compile", "--steps", "3", "--warmup", "1"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    result = json.loads(out.with_suffix(".json").read_text())
    rows, text = result["rows"], out.read_text()
    assert "CPU tiny" in result["label"] and "CPU tiny" in text
    assert "Skipped in --tiny: DDP + compile (inductor" in text  # said, not silently dropped
    assert [(r["model"], r["config"], r["impl"]) for r in rows] == [
        (m, c, impl) for m in models for c in configs for impl in ("rfkit", "plain")
    ]
    for r in rows:
        assert f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['config']} | {r['impl']} |" in text
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("images_per_s", "tokens_per_s", "tflops_per_gpu"))
        assert r["tokens_per_s"] == pytest.approx(r["images_per_s"] * 16)  # 4x8x8 latents, 2x2 patches
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # a CPU has no bf16 peak or CUDA memory
        # zero-initialised output: the first loss is E||x1 - x0||^2 per element = 2 for N(0, 1) data and noise
        assert r["first_loss"] == pytest.approx(2.0, abs=0.35)
        assert r["final_checksum"] != r["initial_checksum"]  # it trained
    for ours, plain in zip(rows[::2], rows[1::2], strict=True):
        assert (ours["params"], ours["initial_checksum"]) == (plain["params"], plain["initial_checksum"])
        ratio = f"| {ours['images_per_s'] / plain['images_per_s']:.3f} |"
        assert ratio in text  # the framework-overhead ratio, on the rfkit row
