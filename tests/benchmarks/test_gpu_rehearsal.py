"""benchmarks/gpu_rehearsal.py's CPU-side parts: its arguments, the HBM bound and MFU formulas, and its refusal
without CUDA (the measurements themselves need a lent GPU)."""

from __future__ import annotations

import pytest
import torch

import gpu_rehearsal


@pytest.mark.parametrize("batch, bandwidth_gbps, weight_bytes, expected", [
    (1, 3350, 16_060_000_000, 208.6),      # H100 SXM, Llama-3.1-8B + music rows in bf16
    (32, 3350, 16_060_000_000, 6675.0),    # 32 sequences share each read of the weights
    (8, 4800, 2_000_000_000, 19200.0),     # H200, a 1B model
])
def test_the_hbm_bound_is_batch_times_bandwidth_over_weight_bytes(batch, bandwidth_gbps, weight_bytes, expected):
    assert gpu_rehearsal.hbm_bound_tokens_per_s(batch, bandwidth_gbps, weight_bytes) == pytest.approx(expected,
                                                                                                     rel=1e-3)


@pytest.mark.parametrize("params, embedding, layers, hidden, seq, tokens_per_s, peak, expected_mfu", [
    # 6N for N = 7e9 multiplying parameters, attention 12 x 32 x 4096 x 4096 = 6.44e9 per token.
    (7.5e9, 0.5e9, 32, 4096, 4096, 10_000, 989.0, (6 * 7e9 + 6.442450944e9) * 10_000 / 989e12),
    # Short rows: attention is small beside 6N; an A100's peak.
    (1.0e9, 0.0, 16, 2048, 512, 50_000, 312.0, (6e9 + 12 * 16 * 2048 * 512) * 50_000 / 312e12),
])
def test_mfu_counts_six_flops_per_multiplying_parameter_and_attention(params, embedding, layers, hidden, seq,
                                                                      tokens_per_s, peak, expected_mfu):
    flops = gpu_rehearsal.train_flops_per_token(int(params), int(embedding), layers, hidden, seq)
    assert flops == pytest.approx(6 * (params - embedding) + 12 * layers * hidden * seq)
    assert gpu_rehearsal.mfu(tokens_per_s, flops, peak) == pytest.approx(expected_mfu, rel=1e-9)


@pytest.mark.parametrize("gpu, family_value", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                               ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", None)])
def test_the_peak_is_looked_up_by_the_gpus_family(gpu, family_value):
    assert gpu_rehearsal.lookup(gpu_rehearsal.PEAK_BF16_TFLOPS, gpu) == family_value


def test_the_arguments_default_to_the_8b_decode_and_an_8_layer_stage_1():
    args = gpu_rehearsal.parse_args([])
    assert (args.layers, args.train_layers, args.seq, args.levels) == (32, 8, 4096, [1, 8, 32])
    assert args.gradient_checkpointing is True and args.skip == []
    args = gpu_rehearsal.parse_args(["--train-layers", "4", "--no-gradient-checkpointing", "--skip", "decode"])
    assert (args.train_layers, args.gradient_checkpointing, args.skip) == (4, False, ["decode"])


@pytest.mark.parametrize("argv", [["--layers", "0"], ["--seq", "-1"], ["--skip", "everything"]])
def test_bad_arguments_are_refused_by_name(argv, capsys):
    with pytest.raises(SystemExit):
        gpu_rehearsal.parse_args(argv)
    assert argv[0] in capsys.readouterr().err


def test_the_8b_shape_is_llama_3_1_8b_on_the_rehearsal_vocabulary():
    shape = gpu_rehearsal.shape(32)
    assert (shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers, shape.num_key_value_heads) == (
        4096, 14336, 32, 8)
    assert shape.llama3_vocabulary and not shape.tie_word_embeddings
    assert dict(shape.rope_scaling)["factor"] == 8.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_stops_at_once_with_a_message(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert gpu_rehearsal.main(["--out", str(out)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not out.exists()
