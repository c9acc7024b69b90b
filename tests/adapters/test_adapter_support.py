"""One adapter lookup (the registry) and one support check (`framework.support`), keyed on drop kinds.

- a third-party placement class (not a built-in name) whose drops are "layer" drops attaches and prunes on LLaVA
  and Qwen2-VL, exactly as the built-in placement with the same drops;
- ``prune`` and ``support_problems`` give the same message; the error classes are kept;
- ``model.adapter`` (YAML) is honoured at run time: the runner attaches with the named adapter;
- the framework does not import the adapters.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pluggy
import pytest
import torch

from adapter_fixtures import NeedsCls, llava_inputs, record_hooks, single_thread, tiny_llava, tiny_llava_onevision
from qwen_fixtures import MIXED, batch
from qwen_fixtures import tiny_qwen
from vtprune import framework
from vtprune.adapters.llava import LlavaAdapter
from vtprune.adapters.llava_onevision import LlavaOnevisionAdapter
from vtprune.adapters.qwen2_vl import QwenVLAdapter
from vtprune.framework import MissingSignalError, VtpruneError, compose, prune
from vtprune.framework.placements import Drop, LayerPlacement
from vtprune.framework.support import LAYER_SIGNALS, check_support, support_problems

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)
hookimpl = pluggy.HookimplMarker("vtprune")
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, eq=False)
class TwoStep(LayerPlacement):
    """A third-party placement: drop to the budget before layer 1, then half of what remains before layer 2
    (the drops of the built-in ``schedule(layers=[1,2],ratio=0.5)``, under a name no adapter lists)."""

    name: ClassVar[str] = "two_step"
    description: ClassVar[str] = "test placement: two in-LLM drops"
    provides: ClassVar[frozenset[str]] = LAYER_SIGNALS | {"visual", "visual_mask", "prompt", "prompt_mask"}
    first: int = 1

    def drops(self, budget: int | float) -> tuple[Drop, ...]:
        return (Drop("layer", self.first, budget), Drop("layer", self.first + 1, 0.5))


@dataclass(frozen=True, eq=False)
class AtVision(LayerPlacement):
    """A third-party placement whose drop is a "vision" drop."""

    name: ClassVar[str] = "at_vision"
    description: ClassVar[str] = "test placement: one vision drop"
    provides: ClassVar[frozenset[str]] = frozenset({"visual", "visual_mask"})

    def drops(self, budget: int | float) -> tuple[Drop, ...]:
        return (Drop("vision", None, budget),)


class _Placements:
    @hookimpl
    def vtprune_register_stages(self, registry):
        registry.add_stage(TwoStep)
        registry.add_stage(AtVision)


@pytest.fixture(scope="module")
def registry():
    return framework.build_registry(autoload=False, plugins=[_Placements()])


RECIPE = "attention+critical+fps+{placement}"


def _run(model, inputs, recipe, registry, budget):
    with prune(model, recipe, budget=budget, registry=registry) as handle:
        logits = model(**inputs).logits
    return logits, handle.last_selection


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_third_party_layer_placement_prunes_like_the_builtin_with_the_same_drops(family, registry):
    if family == "llava":
        model, adapter = tiny_llava(), LlavaAdapter
        inputs = llava_inputs(model, images_per_sample=(1, 2))
    else:
        model, adapter = tiny_qwen(), QwenVLAdapter
        inputs, _ = batch(MIXED)
    assert "two_step" not in adapter.placements  # the adapter does not list the name
    pipeline = compose(RECIPE.format(placement="two_step"), registry=registry)
    assert support_problems(adapter, pipeline) == []
    with torch.no_grad():
        model(**inputs)  # transformers installs its own output-recording hooks at the first forward
    hooks = record_hooks(model)
    logits, result = _run(model, inputs, pipeline, registry, 4)
    reference, expected = _run(model, inputs, RECIPE.format(placement="schedule(layers=[1,2],ratio=0.5)"), registry, 4)
    assert [(d.where, d.layer) for d in result.drops] == [("layer", 1), ("layer", 2)]
    assert int(result.drops[0].counts.max()) <= 4 and bool((result.counts < result.num_tokens).all())
    assert torch.equal(result.counts, expected.counts)
    assert torch.equal(result.selection.indices, expected.selection.indices)
    assert torch.equal(logits, reference)
    assert record_hooks(model) == hooks


def test_prune_and_support_problems_give_the_same_message(registry):
    onevision = tiny_llava_onevision()
    name = type(onevision).__name__
    # a drop kind the adapter does not implement: VtpruneError (not MissingSignalError), placement and kind named
    third_party = compose("random+critical+fps+at_vision", registry=registry)
    problems = support_problems(LlavaOnevisionAdapter, third_party, model_name=name)
    assert len(problems) == 1
    with pytest.raises(VtpruneError) as caught:
        prune(onevision, third_party, budget=3, registry=registry)
    assert type(caught.value) is VtpruneError and str(caught.value) == problems[0]
    for part in (name, "'llava_onevision'", "'at_vision'", "'vision' drops", "bilinearly interpolated", "'layer'", "'pre_llm'"):
        assert part in problems[0]
    # a missing signal: MissingSignalError, the reason from the adapter's limitations, what it provides
    needs_cls = NeedsCls(compose("prompt_cosine+critical+fps+pre_llm").placement)
    qwen = tiny_qwen()
    problems = support_problems(QwenVLAdapter, needs_cls, model_name=type(qwen).__name__)
    with pytest.raises(MissingSignalError) as caught:
        prune(qwen, needs_cls, budget=3)
    assert [str(caught.value)] == problems
    for part in ("Qwen2VLForConditionalGeneration", "'qwen2_vl'", "['cls_attention']", "'pre_llm' drops", "no CLS token", "provides"):
        assert part in problems[0]
    with pytest.raises(MissingSignalError, match="no CLS token"):
        check_support(QwenVLAdapter, needs_cls)
    # on-request signals: LLaVA fills CLIP-space signals at pre_llm drops for a placement that requests them
    assert support_problems(LlavaAdapter, compose("cdpruner")) == []
    assert "clip_visual" in LlavaAdapter.provides("pre_llm_clip") and "clip_visual" not in LlavaAdapter.provides("pre_llm")
    assert any("clip_visual" in p for p in support_problems(QwenVLAdapter, compose("cdpruner")))
    # supported: no problem, at any placement whose drop kinds the adapter implements
    for recipe in ("attention+critical+fps+layer(k=2)", "prompt_cosine+critical+fps+pre_llm", "attention+critical+fps+two_step"):
        assert support_problems(LlavaOnevisionAdapter, compose(recipe, registry=registry)) == []


def test_yaml_model_adapter_is_the_adapter_attached(tmp_path):
    from adapter_fixtures import tiny_llava_processor
    from vtprune.experiments.models import HFBackend, adapter_by_name
    from vtprune.framework import UnknownNameError

    class RenamedLlava(LlavaAdapter):
        name = "renamed_llava"

    class Plugin:
        @hookimpl
        def vtprune_register_adapters(self, registry):
            registry.add_adapter(RenamedLlava)

    registry = framework.build_registry(autoload=False, plugins=[Plugin()])
    tiny_llava(seed=1).save_pretrained(tmp_path)
    tiny_llava_processor().save_pretrained(tmp_path)
    spec = {"name": str(tmp_path), "device": "cpu", "dtype": "float32"}
    pipeline = compose("attention+critical+fps+layer(k=2)")
    by_class = HFBackend(spec, registry)
    with by_class.prune(pipeline, 4, "keep") as handle:
        assert handle.adapter is LlavaAdapter  # the model class's adapter (registered first)
    named = HFBackend({**spec, "adapter": "renamed_llava"}, registry)
    with named.prune(pipeline, 4, "keep") as handle:
        assert handle.adapter is RenamedLlava
    assert adapter_by_name("renamed_llava", registry) is RenamedLlava
    with pytest.raises(UnknownNameError, match="renamed_llava"):
        adapter_by_name("nope", registry)
    with pytest.raises(UnknownNameError, match="llava"):
        prune(named.module, pipeline, budget=4, registry=registry, adapter="nope")


def test_framework_does_not_import_the_adapters():
    for path in sorted((ROOT / "framework").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            assert not any(n.startswith(("vtprune.adapters", "adapters")) for n in names), path.name


class NeedsFrames:
    """A duck-typed pipeline at ``placement`` that requires the video signals (what the temporal stages read)."""

    requires = frozenset({"visual", "frames", "frame_index"})

    def __init__(self, placement):
        self.placement = placement

    def select(self, signals, budget):  # pragma: no cover - never reached on an image-only adapter
        raise AssertionError


@pytest.mark.parametrize("placement", ["pre_llm", "layer(k=1)", "schedule(layers=[1,2],ratio=0.5)"])
def test_frames_are_refused_on_an_image_only_adapter_and_declared_by_the_video_ones(placement):
    """``frames`` / ``frame_index`` are provided by the adapters that take videos (support_report says which); an
    image-only adapter (LLaVA) refuses a pipeline requiring them before anything is attached, quoting its limitation."""
    from vtprune.adapters.plugin import BUILTIN_ADAPTERS

    pipeline = NeedsFrames(compose(f"prompt_cosine+critical+fps+{placement}").placement)
    model = tiny_llava()
    hooks = record_hooks(model)
    with pytest.raises(MissingSignalError) as error:
        prune(model, pipeline, budget=4)
    message = str(error.value)
    assert "'frame_index', 'frames'" in message and "takes images only" in message and "llava" in message
    assert record_hooks(model) == hooks
    video = {"llava_onevision", "llava_next_video", "video_llava", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v",
             "llava_onevision1_5"}
    for adapter in BUILTIN_ADAPTERS:
        problems = support_problems(adapter, pipeline)
        assert (not problems) == (adapter.name in video), (adapter.name, problems)
        if adapter.name not in video:
            assert all("frame" in p for p in problems) and adapter.limitations.get("frames")
