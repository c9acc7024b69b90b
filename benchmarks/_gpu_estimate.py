"""A first-order GPU cost model for selection: launches x launch cost + bytes / HBM bandwidth.

Not part of the package: used by ``benchmarks/selection.py --count-ops``. It estimates what the
counted ops of one ``Pipeline.select`` would cost on an H100, as a share of the FLOPs-ideal prefill of
the 7B model the selection prunes. Every constant is stated here; none is measured on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from vtprune.experiments.cost import prefill_flops

__all__ = ["H100", "GPUModel", "ideal_prefill_seconds", "selection_seconds", "FULL_DECODER_LAYERS", "TEXT_TOKENS"]


@dataclass(frozen=True)
class GPUModel:
    """Constants of one GPU (datasheet values, dense, no sparsity)."""

    name: str
    launch_s: float  # host cost of one eager kernel launch (PyTorch eager, no CUDA graph)
    hbm_bytes_per_s: float  # memory bandwidth
    bf16_flops_per_s: float  # peak dense BF16 tensor-core throughput


#: NVIDIA H100 SXM5 80 GB: 3.35 TB/s HBM3, 989 TFLOP/s dense BF16 (datasheet); 5 us per eager launch
#: (the low end of the 5-10 us PyTorch eager dispatch + launch cost quoted in issue 19).
H100 = GPUModel(name="H100 SXM", launch_s=5e-6, hbm_bytes_per_s=3.35e12, bf16_flops_per_s=989e12)

#: Decoder layers of the full models (their Hugging Face configs); benchmarks/_harness.py keeps every
#: other dimension of the profile and cuts only the layer count.
FULL_DECODER_LAYERS = {"llava-1.5-7b": 32, "qwen2.5-vl-7b": 28}

#: Text tokens around the image in the benchmark prompts (8 before, 32 after: `_harness.llava_batch`).
TEXT_TOKENS = 8 + 32


def selection_seconds(launches: int, bytes_moved: int, gpu: GPUModel = H100) -> float:
    """Estimated GPU time of one select: every launch pays the launch cost, and every byte moves once
    at HBM bandwidth (no overlap assumed, so this is an upper-bound style estimate)."""
    return launches * gpu.launch_s + bytes_moved / gpu.hbm_bytes_per_s


def ideal_prefill_seconds(profile_text: dict, image_tokens: int, batch: int = 1, profile: str = "llava-1.5-7b",
                          gpu: GPUModel = H100) -> float:
    """FLOPs of the full model's language-model prefill (``experiments.cost.prefill_flops``: causal
    attention, logits of the last token only) over ``image_tokens + TEXT_TOKENS`` tokens, at the GPU's
    peak BF16 throughput: the time no implementation can beat (vision tower not included)."""
    config = SimpleNamespace(**profile_text, num_hidden_layers=FULL_DECODER_LAYERS[profile])
    return batch * prefill_flops(config, image_tokens + TEXT_TOKENS, causal=True) / gpu.bf16_flops_per_s
