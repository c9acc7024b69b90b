"""OpenVINO GenAI's built-in CDPruner (``VLMPipeline``, ``GenerationConfig.pruning_ratio``) against vtprune's
matching presets, side by side on one Qwen2-VL model and the same questions, on a CPU.

Needs the optional extra ``openvino`` (``pip install 'vtprune[openvino]'``: openvino-genai, which brings
openvino and openvino-tokenizers); without ``openvino_genai`` it prints why and exits 0. The model:
``--model DIR`` (a saved ``Qwen2VLForConditionalGeneration`` with its tokenizer and image processor, e.g.
the Qwen2-VL organism) or ``--tiny`` (a tiny random one, patch 14, 64 merged tokens per 224 px image, saved
to a temp dir). The OpenVINO IR: ``--ir DIR`` (exported before) or exported here with ``optimum-cli export
openvino`` run by ``--export-python PY`` (default: this python). optimum-intel 2.2.0 exports Qwen2-VL only
with transformers <= 5.0 (vtprune needs >= 5.25), so the export runs in a venv of its own
(docs/performance.md)::

    python benchmarks/openvino_peer.py --tiny --questions 40 --export-python /path/to/export-venv/bin/python
    python benchmarks/openvino_peer.py --model weights_dir --ir ir_dir --ratios 50 75 90

Both sides get the same prompt text (``--prompt``, default ``TINY_TEMPLATE`` / ``ORGANISM_TEMPLATE``):
OpenVINO with its native image tag and ``apply_chat_template = False``, transformers with the tag
expanded to one ``<|image_pad|>`` per merged token; the script checks that OpenVINO's converted tokenizer
gives the same ids as transformers' on every prompt and says so. For each pruning ratio r (percent
pruned), split on (OpenVINO's default) and off (``CDPRUNER_SPLIT_THRESHOLD=0``), it runs OpenVINO at r and
vtprune's ``cdpruner_ov`` / ``cdpruner_ov_full`` at the same kept count (``ov_keep_count``), greedy, and
prints accuracy (first answer word) with 95% Wilson intervals, agreement (identical whole answers) with
each side's unpruned answers and with the other side, the prompt length the LLM prefilled (OpenVINO:
``perf_metrics.get_num_input_tokens()``; transformers: measured at the first decoder layer) and seconds
per question. Kept-token overlap: OpenVINO GenAI's Python API does not expose the kept indices
(``CDPruner::get_last_selected_tokens`` is C++-internal), so it is reported as not available.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["EXTRA_MISSING", "extra_available", "kept_counts", "ov_tokenizer_json", "wilson_interval", "main"]

#: The message printed (exit 0) when the optional extra is not installed.
EXTRA_MISSING = "openvino_peer: skipped: openvino-genai is not installed (pip install 'vtprune[openvino]')"
#: Merged visual tokens of one 224 x 224 image at patch 14, spatial merge 2.
IMAGE_TOKENS = 64
IMAGE_SIDE = 224
#: Qwen2-VL's vision markers and image placeholder (one placeholder per merged token in the prompt).
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
#: OpenVINO GenAI's native Qwen2-VL image tag (``InputsEmbedderQwen2VL::NATIVE_TAG``): where it stands in
#: the prompt, the pipeline puts the image's ``<|image_pad|>`` run.
OV_IMAGE_TAG = VISION_START + IMAGE_PAD + VISION_END
#: Prompt of ``--tiny`` (the ChatML turn of its chat template) and of ``--model`` (the Qwen2-VL organism's
#: single-turn prompt, ``experiments/organism/qwen_processor.build_qwen_prompt``); ``--prompt`` overrides.
TINY_TEMPLATE = "<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n"
ORGANISM_TEMPLATE = "USER: {image} {question} ASSISTANT:"
#: ``--ov-precision`` choices: the CPU plugin's ``INFERENCE_PRECISION_HINT``, or its default.
OV_PRECISIONS = ("f32", "bf16", "default")
#: z of a two-sided 95% interval.
Z95 = 1.959963984540054


def extra_available() -> bool:
    """True when ``openvino_genai`` can be imported (the extra ``openvino`` is installed)."""
    return importlib.util.find_spec("openvino_genai") is not None


def kept_counts(ratios: Sequence[int], tokens: int = IMAGE_TOKENS) -> dict[int, int]:
    """OpenVINO's kept count per image of ``tokens`` merged tokens at each pruning ratio (percent)."""
    from vtprune.strategies.functional.cdpruner_ov import ov_keep_count

    return {int(r): ov_keep_count(tokens, int(r)) for r in ratios}


def wilson_interval(correct: int, total: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``correct / total`` ((0, 1) when total is 0)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + Z95**2 / total
    centre = (p + Z95**2 / (2 * total)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / total + Z95**2 / (4 * total**2)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# -- model --------------------------------------------------------------------------------------------


def _tiny_model(out: Path, seed: int) -> None:
    """Save a tiny random Qwen2-VL (patch 14, merge 2), a byte-level BPE tokenizer and its processor."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers import Qwen2VLImageProcessor

    from vtprune.experiments.organism.task import make_split

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    corpus = [f"user {s.question} assistant {s.answer}" for s in make_split("train", 200)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok.save_pretrained(out)
    ids = {name: tok.convert_tokens_to_ids(name) for name in specials}
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    side = IMAGE_SIDE * IMAGE_SIDE
    Qwen2VLImageProcessor(min_pixels=side, max_pixels=side, patch_size=14, merge_size=2, temporal_patch_size=2).save_pretrained(out)


#: A whitespace split that openvino_tokenizers converts as written: ``Split(\s+, removed)``.
WHITESPACE_SPLIT = {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Removed", "invert": False}


def ov_tokenizer_json(tokenizer: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """``tokenizer.json`` with every ``WhitespaceSplit`` pre-tokenizer replaced by ``WHITESPACE_SPLIT``.

    openvino-tokenizers 2026.4 converts ``WhitespaceSplit`` (Python's ``str.split``) into the ``Whitespace``
    regex ``\\w+|[^\\w\\s]+``, which also splits at punctuation: the Qwen2-VL organism's word-level
    ``USER:`` / ``ASSISTANT:`` become two unknown tokens each in OpenVINO. ``Split`` on ``\\s+`` (removed)
    is the same split in tokenizers and is converted faithfully. Returns the new dict and how many
    pre-tokenizers were replaced (the input is not modified).
    """
    out = json.loads(json.dumps(tokenizer))
    replaced = 0

    def fix(node: Any) -> Any:
        nonlocal replaced
        if isinstance(node, dict) and node.get("type") == "WhitespaceSplit":
            replaced += 1
            return dict(WHITESPACE_SPLIT)
        if isinstance(node, dict) and node.get("type") == "Sequence":
            node["pretokenizers"] = [fix(child) for child in node.get("pretokenizers", [])]
        return node

    out["pre_tokenizer"] = fix(out.get("pre_tokenizer"))
    return out, replaced


def _export(model_dir: Path, ir_dir: Path, python: str) -> None:
    """``optimum-cli export openvino`` (fp32 weights) with ``python``; raises with its output on failure.

    It exports a copy of ``model_dir`` whose ``tokenizer.json`` went through ``ov_tokenizer_json`` (the
    transformers side keeps the original; ``_check_tokenization`` then compares the two).
    """
    source = ir_dir.parent / (ir_dir.name + "_source")
    shutil.copytree(model_dir, source)
    tokenizer_file = source / "tokenizer.json"
    if tokenizer_file.exists():
        fixed, replaced = ov_tokenizer_json(json.loads(tokenizer_file.read_text()))
        if replaced:
            tokenizer_file.write_text(json.dumps(fixed))
            print(f"export: {replaced} WhitespaceSplit pre-tokenizer(s) written as Split(\\s+) for openvino-tokenizers")
    command = [python, "-c", "from optimum.commands.optimum_cli import main; main()", "export", "openvino",
               "--model", str(source), "--task", "image-text-to-text", "--weight-format", "fp32", str(ir_dir)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"export failed ({' '.join(command)}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def _check_tokenization(ir_dir: Path, tokenizer: Any, prompts: list[str]) -> str:
    """Compare OpenVINO's tokenizer (the IR's) with transformers' on ``prompts``; a one-line verdict."""
    import openvino_genai as ov_genai

    ov_tokenizer = ov_genai.Tokenizer(str(ir_dir))
    differ = [p for p in prompts
              if ov_tokenizer.encode(p).input_ids.data.reshape(-1).tolist() != tokenizer(p)["input_ids"]]
    if not differ:
        return f"tokenization: OpenVINO and transformers give the same ids on all {len(prompts)} prompts"
    return (f"tokenization: WARNING: OpenVINO and transformers differ on {len(differ)}/{len(prompts)} prompts, "
            f"e.g. ...{differ[0][-80:]!r}")


# -- the two runners ----------------------------------------------------------------------------------


def _questions(n: int) -> list[Any]:
    from vtprune.experiments.organism.task import make_split

    return make_split("test", n)


def _image(sample: Any):
    from PIL import Image

    return Image.fromarray(sample.image).convert("RGB").resize((IMAGE_SIDE, IMAGE_SIDE), Image.BICUBIC)


def _normal(text: str) -> str:
    return " ".join(text.strip().lower().split()[:1])


def _prompt(template: str, image: str, question: str) -> str:
    """``template`` with ``{image}`` and ``{question}`` filled in (the same text for both sides)."""
    return template.replace("{image}", image).replace("{question}", question)


def _run_openvino(ir_dir: Path, samples: list[Any], ratio: int, split: bool, max_new_tokens: int,
                  template: str, precision: str) -> tuple[list[str], float, list[int]]:
    """OpenVINO's answers, seconds per question and prompt length per question (``num_input_tokens``).

    The prompt is given as text with OpenVINO's Qwen2-VL image tag (``OV_IMAGE_TAG``, expanded by the
    pipeline to one ``<|image_pad|>`` per merged token) and ``apply_chat_template = False``, so both sides
    tokenize the same string. ``perf_metrics.get_num_input_tokens()`` is the length of the prefill's
    ``inputs_embeds`` after pruning (``VLMPipeline`` sets it from the pruned embeddings). ``precision``
    is the CPU plugin's ``INFERENCE_PRECISION_HINT`` for the pipeline's models ("default": the plugin's
    choice, bf16 on CPUs with bf16 units); the pruner's own kernel graph is compiled by a fresh
    ``ov::Core`` with the plugin's defaults whatever this says.
    """
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    from vtprune.strategies.functional.cdpruner_ov import OV_RELEVANCE_WEIGHT, OV_SPLIT_THRESHOLD

    os.environ["CDPRUNER_SPLIT_THRESHOLD"] = str(OV_SPLIT_THRESHOLD) if split else "0"  # read when the pruner is built
    properties = {} if precision == "default" else {"INFERENCE_PRECISION_HINT": precision}
    pipe = ov_genai.VLMPipeline(str(ir_dir), "CPU", **properties)
    config = ov_genai.GenerationConfig()
    config.max_new_tokens = max_new_tokens
    config.pruning_ratio = ratio
    config.relevance_weight = OV_RELEVANCE_WEIGHT
    config.apply_chat_template = False
    answers, lengths, start = [], [], time.perf_counter()
    for sample in samples:
        image = ov.Tensor(np.asarray(_image(sample), dtype=np.uint8)[None])  # (1, H, W, 3)
        result = pipe.generate(_prompt(template, OV_IMAGE_TAG, sample.question), images=[image], generation_config=config)
        answers.append(result.texts[0])
        lengths.append(int(result.perf_metrics.get_num_input_tokens()))
    return answers, (time.perf_counter() - start) / max(1, len(samples)), lengths


class _HFRunner:
    """The same model in transformers, pruned by vtprune (``prune(model, preset, kept)``)."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

        self.torch = torch
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        # tokenizer + image processor by hand: AutoProcessor wants a video processor, which needs torchvision
        self.images = Qwen2VLImageProcessor.from_pretrained(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.image_token_id = self.model.config.image_token_id

    def run(self, samples: list[Any], preset: Optional[str], kept: int, max_new_tokens: int,
            template: str) -> tuple[list[str], float, list[int]]:
        """Answers, seconds per question and the LLM's prefill length per question.

        The prefill length is measured, not computed: a forward pre-hook on the first decoder layer
        (registered after vtprune's hooks, removed after the run) records the longest sequence that
        layer sees during each ``generate`` (the prefill; decoding steps are one token long).
        """
        from vtprune.framework import prune

        handle = prune(self.model, preset, kept) if preset else None
        seen: list[int] = []

        def record(_module: Any, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, L, D)
            seen.append(int(hidden.shape[1]))

        layer = self.model.model.language_model.layers[0]
        hook = layer.register_forward_pre_hook(record, with_kwargs=True)
        answers, lengths, start = [], [], time.perf_counter()
        try:
            for sample in samples:
                pixels = self.images(images=[_image(sample)], return_tensors="pt")
                merged = int(pixels["image_grid_thw"].prod()) // (self.images.merge_size**2)
                image = VISION_START + IMAGE_PAD * merged + VISION_END
                inputs = dict(self.tokenizer([_prompt(template, image, sample.question)], return_tensors="pt"), **pixels)
                # what Qwen2VLProcessor adds: without it transformers' generate silently drops M-RoPE
                # (the image tokens get 1-D text positions) instead of raising as a plain forward does
                inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.image_token_id).int()  # (1, L)
                seen.clear()
                with self.torch.no_grad():
                    out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                lengths.append(max(seen))
                answers.append(self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        finally:
            hook.remove()
            if handle is not None:
                handle.remove()
        return answers, (time.perf_counter() - start) / max(1, len(samples)), lengths


# -- report -------------------------------------------------------------------------------------------


def _same(text: str) -> str:
    """An answer for agreement: the whole generated text, whitespace normalised."""
    return " ".join(text.split())


def _agree(a: list[str], b: list[str]) -> float:
    """Share of questions whose whole greedy answers are identical."""
    return sum(_same(x) == _same(y) for x, y in zip(a, b)) / max(1, len(a))


LABEL_WIDTH = 46


def _span(lengths: list[int]) -> str:
    """The prompt lengths of a run: one number when all questions agree, else ``min-max``."""
    if not lengths:
        return "-"
    low, high = min(lengths), max(lengths)
    return str(low) if low == high else f"{low}-{high}"


def _row(label: str, answers: list[str], samples: list[Any], base: list[str], other: Optional[list[str]],
         seconds: float, lengths: list[int]) -> str:
    correct = sum(_normal(a) == _normal(s.answer) for a, s in zip(answers, samples))
    low, high = wilson_interval(correct, len(samples))
    cross = f"{_agree(answers, other):.3f}" if other is not None else "-"
    return (f"{label:<{LABEL_WIDTH}} {correct / max(1, len(samples)):.3f} [{low:.3f}, {high:.3f}]  "
            f"{_agree(answers, base):.3f}      {cross:<8} {_span(lengths):<7} {seconds:.3f}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="saved Qwen2-VL model dir (with tokenizer and image processor)")
    source.add_argument("--tiny", action="store_true", help="a tiny random Qwen2-VL saved to a temp dir")
    parser.add_argument("--ir", type=Path, help="pre-exported OpenVINO IR dir of the same model")
    parser.add_argument("--export-python", default=sys.executable, help="python with optimum-intel for the export")
    parser.add_argument("--prompt", help="prompt template with {image} and {question} (default: the model's; see TINY_TEMPLATE, ORGANISM_TEMPLATE)")
    parser.add_argument("--ov-precision", choices=OV_PRECISIONS, default="f32",
                        help="OpenVINO CPU INFERENCE_PRECISION_HINT of the pipeline's models (f32: as transformers runs)")
    parser.add_argument("--ratios", type=int, nargs="+", default=[50, 75, 90])
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not extra_available():
        print(EXTRA_MISSING)
        return 0
    template = args.prompt or (TINY_TEMPLATE if args.tiny else ORGANISM_TEMPLATE)
    if "{image}" not in template or "{question}" not in template:
        parser.error(f"--prompt must contain {{image}} and {{question}}, got {template!r}")
    counts = kept_counts(args.ratios)
    with tempfile.TemporaryDirectory(prefix="vtprune_ovpeer_") as tmp:
        model_dir = args.model
        if args.tiny:
            model_dir = Path(tmp) / "model"
            _tiny_model(model_dir, args.seed)
        ir_dir = args.ir
        if ir_dir is None:
            ir_dir = Path(tmp) / "ir"
            _export(model_dir, ir_dir, args.export_python)
        samples = _questions(args.questions)
        hf = _HFRunner(model_dir)
        expanded = VISION_START + IMAGE_PAD * IMAGE_TOKENS + VISION_END
        tokenization = _check_tokenization(ir_dir, hf.tokenizer, [_prompt(template, expanded, s.question) for s in samples])
        ov_base, ov_t, ov_len = _run_openvino(ir_dir, samples, 0, True, args.max_new_tokens, template, args.ov_precision)
        hf_base, hf_t, hf_len = hf.run(samples, None, IMAGE_TOKENS, args.max_new_tokens, template)
        print(f"model: {'tiny random Qwen2-VL' if args.tiny else model_dir}; {len(samples)} questions; "
              f"{IMAGE_TOKENS} visual tokens per image; greedy, {args.max_new_tokens} new tokens; CPU")
        print(tokenization)
        print("kept-token overlap: not available (OpenVINO GenAI's Python API does not expose the kept indices)")
        print("prompt: openvino = perf_metrics.get_num_input_tokens(); vtprune = prefill length at the first decoder layer")
        print(f"{'run':<{LABEL_WIDTH}} {'accuracy [95% Wilson]':<22} agree_base agree_x  prompt  s/question")
        print(_row("openvino unpruned", ov_base, samples, ov_base, hf_base, ov_t, ov_len))
        print(_row("vtprune (transformers) unpruned", hf_base, samples, hf_base, ov_base, hf_t, hf_len))
        for ratio, kept in counts.items():
            for split, preset in ((True, "cdpruner_ov"), (False, "cdpruner_ov_full")):
                ov_ans, ov_s, ov_l = _run_openvino(ir_dir, samples, ratio, split, args.max_new_tokens, template,
                                                    args.ov_precision)
                vt_ans, vt_s, vt_l = hf.run(samples, preset, kept, args.max_new_tokens, template)
                tag = f"r={ratio} kept={kept} split={'on' if split else 'off'}"
                print(_row(f"openvino {tag}", ov_ans, samples, ov_base, vt_ans, ov_s, ov_l))
                print(_row(f"vtprune {preset} {tag}", vt_ans, samples, hf_base, ov_ans, vt_s, vt_l))
    return 0


if __name__ == "__main__":
    sys.exit(main())
