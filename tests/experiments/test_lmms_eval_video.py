"""Videos through the vtprune lmms-eval model (`vtprune.experiments.video`): a tiny video file written here with
PyAV (the ``video`` extra; the tests skip without it) is a request's visual, as lmms-eval's video tasks pass it
(``[path]``); the plugin decodes it, samples ``max_frames_num`` frames and the tiny random LLaVA-OneVision sees one
video row of that many frames. lmms-eval's base class is the real one where lmms-eval is installed, else a stub."""

from __future__ import annotations

import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV is not installed: pip install 'vtprune[video]'")

from adapter_fixtures import IMAGE_SIZE, SignalRecorder, single_thread, tiny_llava_onevision, tiny_tokenizer  # noqa: E402
from vtprune.experiments.video import is_video, read_video, sample_indices  # noqa: E402
from vtprune.framework import compose  # noqa: E402
from vtprune.framework.errors import VtpruneError  # noqa: E402

VIDEO_WORD = "w94"  # the tiny tokenizer's word whose id is tiny_llava_onevision's video_token_id
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:{% if m['content'] is string %} {{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %} <image>{% elif p['type'] == 'video' %} " + VIDEO_WORD +
    "{% else %} {{ p['text'] }}{% endif %}{% endfor %}{% endif %} w41 {% endfor %}{% if add_generation_prompt %}w42{% endif %}"
)
FRAMES_IN_FILE = 10
STUB_MODEL = """
import abc
class lmms(abc.ABC):
    is_simple = True
    def __init__(self):
        self.task_dict = {}
"""


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


def write_video(path, frames: int = FRAMES_IN_FILE, size: int = 32) -> np.ndarray:
    """An mpeg4 .mp4 of ``frames`` frames, frame i a flat grey of level 20 * i; returns the levels written."""
    levels = np.array([20 * i for i in range(frames)], dtype=np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for level in levels:
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), level, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return levels


@pytest.fixture
def lmms_base(tmp_path, monkeypatch, onevision):
    """The plugin module with its class rebuilt on lmms-eval's real base class, or on a stub of it."""
    import importlib.util

    if importlib.util.find_spec("lmms_eval") is None:
        folder = tmp_path / "stub" / "lmms_eval" / "api"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / "__init__.py").write_text("")
        (folder / "model.py").write_text(textwrap.dedent(STUB_MODEL))
        monkeypatch.syspath_prepend(str(tmp_path / "stub"))
        for module in [m for m in sys.modules if m == "lmms_eval" or m.startswith("lmms_eval.")]:
            monkeypatch.delitem(sys.modules, module)
    import transformers

    import vtprune.experiments.lmms_eval_model as plugin

    real = transformers.AutoProcessor.from_pretrained
    monkeypatch.setattr(
        transformers.AutoProcessor, "from_pretrained",
        lambda path, *a, **k: onevision.processor if str(path) == onevision.path else real(path, *a, **k),
    )

    monkeypatch.setattr(plugin, "_CLASS", None)
    yield plugin


def _processor_class():
    """``LlavaOnevisionProcessor`` that can be built without a video processor: transformers 5 checks the
    ``video_processor`` argument's class even when it is None, and that class exists only with torchvision."""
    from transformers import LlavaOnevisionProcessor

    class NoVideoProcessorOnevision(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return NoVideoProcessorOnevision


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    """A tiny random LLaVA-OneVision saved to a folder, and its processor (no video processor: transformers
    builds one only with torchvision), which ``AutoProcessor.from_pretrained`` of that folder returns in these tests."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    LlavaOnevisionProcessor = _processor_class()
    folder = tmp_path_factory.mktemp("onevision")
    model = tiny_llava_onevision()
    model.save_pretrained(folder)
    pinpoints = model.config.image_grid_pinpoints
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=pinpoints, do_pad=True
    )
    patches = (IMAGE_SIZE // model.config.vision_config.patch_size) ** 2
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", VIDEO_WORD]})  # as a real <video>: split out whole
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=patches,
        vision_feature_select_strategy="full", chat_template=TEMPLATE, video_token=VIDEO_WORD,
        vision_aspect_ratio=model.config.vision_aspect_ratio,
    )
    return SimpleNamespace(path=str(folder), processor=processor, side=-(-int(patches**0.5) // 2), video_id=int(model.config.video_token_id))


def _requests(model, docs, visual):
    """lmms-eval ``generate_until`` requests: ``args`` = (context, gen_kwargs, doc_to_visual, doc_id, task, split)."""
    model.task_dict["toy_video"] = {"test": docs}
    return [
        SimpleNamespace(args=(d["q"], {"until": ["\n"], "max_new_tokens": 2}, visual, i, "toy_video", "test"))
        for i, d in enumerate(docs)
    ]


def test_sample_indices_is_lmms_evals_uniform_rule() -> None:
    def plain(total, count):  # lmms-eval llava_onevision.load_video, loop-style
        step = (total - 1) / (count - 1) if count > 1 else 0.0
        return [int(i * step) for i in range(count)]

    for total, count in [(10, 4), (300, 32), (5, 8), (1, 3), (33, 32)]:
        assert sample_indices(total, count) == plain(total, count)
    with pytest.raises(VtpruneError, match="max_frames_num"):
        sample_indices(10, 0)


def test_read_video_decodes_the_sampled_frames(tmp_path) -> None:
    path = tmp_path / "clip.MP4"
    levels = write_video(path)
    assert is_video(path) and is_video(str(path)) and not is_video("frame.png") and not is_video(np.zeros(3))
    frames = read_video(path, 4)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    expected = levels[sample_indices(FRAMES_IN_FILE, 4)].astype(float)
    assert np.abs(frames.reshape(4, -1).mean(axis=1) - expected).max() < 4  # lossy codec: the grey levels, near
    with pytest.raises(VtpruneError, match="no such file"):
        read_video(tmp_path / "missing.mp4", 4)


@pytest.mark.parametrize("frames", [4, 3])
def test_a_video_request_reaches_the_model_with_its_frames(lmms_base, onevision, tmp_path, frames) -> None:
    path = tmp_path / "clip.mp4"
    write_video(path)
    cls = lmms_base.build_model_class()
    model = cls(pretrained=onevision.path, recipe="none", device="cpu", dtype="float32", max_frames_num=frames)
    docs = [{"q": "w10 w11 w12"}, {"q": "w13 w14"}]
    answers = model.generate_until(_requests(model, docs, lambda doc: [str(path)]))
    assert len(answers) == 2
    tokens = frames * onevision.side**2 + 1  # pooled frame grids + the video's newline
    assert [a.generation.visual_tokens for a in model.answered] == [[tokens], [tokens]]
    assert [a.sample.videos for a in model.answered] == [[str(path)], [str(path)]]  # paths kept, frames decoded per batch

    recorder = SignalRecorder(compose("fastvid"))
    handle = model.backend.prune(recorder, 0.5, "keep").__enter__()
    try:
        pruned = cls.from_backend(model.backend, handle, batch_size=2, budget=0.5, max_frames_num=frames)
        pruned.generate_until(_requests(pruned, docs, lambda doc: [str(path)]))
    finally:
        handle.__exit__(None, None, None)
    signals = recorder.seen[0]
    assert signals.frames.tolist() == [[frames, onevision.side, onevision.side]] * 2  # one video row per request
    kept = [a.generation.kept[0] for a in pruned.answered]
    assert all(0 < k < tokens for k in kept), kept


#: the video grid's presets, their layers moved into the 4-layer tiny model (as tests/adapters' video end-to-end tests do)
VIDEO_RECIPES = [
    ("fastvid", {}),
    ("holitom", {"k": 2}),
    ("dycoke", {}),
    ("prunevid+diversity.prunevid(segment_ratio=0.5)+prunevid_layer(k=2,alpha=0.4)", {}),
]


@pytest.mark.parametrize("recipe,params", VIDEO_RECIPES)
def test_video_presets_run_through_the_plugin_with_images_in_the_batch(lmms_base, onevision, tmp_path, recipe, params) -> None:
    path = tmp_path / "clip.mp4"
    write_video(path)
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 120, np.uint8)
    cls = lmms_base.build_model_class()
    model = cls(
        pretrained=onevision.path, recipe=recipe, budget=0.5, device="cpu", dtype="float32", max_frames_num=4, batch_size=3,
        **params,
    )
    docs = [{"q": "w10 w11", "v": [str(path)]}, {"q": "w12 w13", "v": [image]}, {"q": "w14", "v": [str(path), image]}]
    answers = model.generate_until(_requests(model, docs, lambda doc: doc["v"]))
    assert len(answers) == 3
    rows = [len(a.generation.visual_tokens) for a in model.answered]
    assert rows == [1, 1, 2]  # one row per video and per image


def test_bad_frame_counts_are_refused(lmms_base, onevision) -> None:
    from vtprune.experiments.tasks import LmmsEvalTask

    with pytest.raises(VtpruneError, match="max_frames_num"):
        lmms_base.build_model_class()(pretrained=onevision.path, recipe="none", device="cpu", max_frames_num=0)
    assert "max_frames_num" in LmmsEvalTask.check_options(max_frames_num=0)
    assert LmmsEvalTask(tasks=["mvbench"], max_frames_num=16).max_frames_num == 16
