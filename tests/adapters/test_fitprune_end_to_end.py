"""FitPrune end to end on the tiny LLaVA against the loop-style official reference (tests/helpers/fitprune_reference.py).

Inference: the tokens each layer deletes are the official ones (sort ascending of cross x self from the head-max
attention of that layer, deleted after it), the logits equal the unpruned model with those tokens masked out of the
later layers, a batch equals each sample alone, and keep-all is the unpruned model bit for bit. Fitting: the
recipe, the probes of the bisection and the budget flag equal the official ``statistical_analysis.py`` loop; the
bisection's result equals a brute-force sweep of its alpha grid; the recipe file round-trips and drives `prune`.
"""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import forward_logits, llava_inputs, masked_reference, removed_by_layer, single_thread, tiny_llava
from fitprune_reference import reference_inference, reference_search
from vtprune import framework
from vtprune.experiments.fitprune_fit import fit_fitprune, load_recipe, recipe_params, run_fit_pass, save_recipe
from vtprune.strategies.functional.fitprune import FlopModel, fitprune_scheme

REGISTRY = framework.build_registry(autoload=False)
LAYERS = 6
TOKENS = 16  # the tiny LLaVA's image tokens
DELETIONS = (2, 3, 0, 4, 1, 1)  # after layers 0..5 (the last layer's is left out: it changes nothing)
ATOL = 1e-5

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=LAYERS)


@pytest.fixture(scope="module")
def samples(model):
    return [llava_inputs(model, (1,), (5 + i,), seed=10 + i) for i in range(3)]


def _kept_per_drop(result, inputs):
    positions = result.image_positions[0]
    return [positions[record.selection.row_indices(0).cpu()] for record in result.drops]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_inference_deletes_what_the_official_code_deletes(model, samples, index):
    sample = samples[index]
    with framework.prune(model, "fitprune", budget=TOKENS - DELETIONS[0], deletions=DELETIONS, tokens=TOKENS,
                         registry=REGISTRY) as handle, torch.no_grad():
        out = model(**sample).logits
    result = handle.last_selection
    official = list(DELETIONS[:-1])  # vtprune leaves the last layer's deletions out (they change no output)
    removed, kept_after = reference_inference(model, sample, official + [0])
    got = _kept_per_drop(result, sample)
    assert [record.layer - 1 for record in result.drops] == sorted(kept_after)
    for kept, layer in zip(got, sorted(kept_after)):
        assert kept.tolist() == kept_after[layer].tolist()
    mine = removed_by_layer(result, *sample["input_ids"].shape, LAYERS)
    assert all(torch.equal(a, b) for a, b in zip(mine, removed))
    with masked_reference(model, removed), torch.no_grad():
        reference = model(**sample).logits
    real = result.sequence_mask[0]
    want = reference[0, result.sequence_index[0]]
    torch.testing.assert_close(out[0][real], want[real], atol=ATOL, rtol=0)


def test_batch_equals_each_sample_alone_and_generate_runs(model):
    inputs = llava_inputs(model, (1, 1), (5, 3), seed=2)
    length = inputs["input_ids"].shape[1]
    with framework.prune(model, "fitprune", budget=TOKENS - DELETIONS[0], deletions=DELETIONS, tokens=TOKENS,
                         registry=REGISTRY) as handle:
        with torch.no_grad():
            out = model(**inputs).logits
        result = handle.last_selection
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert [d.counts.tolist() for d in result.drops] == [[14, 14], [11, 11], [7, 7], [6, 6]]
        for b in range(2):
            real = inputs["attention_mask"][b].bool()
            alone = {"input_ids": inputs["input_ids"][b : b + 1, real],
                     "attention_mask": inputs["attention_mask"][b : b + 1, real],
                     "pixel_values": inputs["pixel_values"][b : b + 1]}
            with torch.no_grad():
                single = model(**alone).logits
            single_gen = model.generate(**alone, max_new_tokens=4, do_sample=False)
            for record, whole in zip(handle.last_selection.drops, result.drops):
                assert record.selection.row_indices(0).tolist() == whole.selection.row_indices(b).tolist()
            torch.testing.assert_close(out[b, -single.shape[1]:], single[0], atol=ATOL, rtol=0)
            assert torch.equal(gen[b, length:], single_gen[0, -4:])


def test_keep_all_is_the_unpruned_model(model):
    inputs = llava_inputs(model, (1, 1), (5, 3), seed=2)
    with torch.no_grad():
        base = model(**inputs).logits
    with framework.prune(model, "fitprune", budget=10_000, deletions=(), registry=REGISTRY) as handle, torch.no_grad():
        out = model(**inputs).logits
    assert handle.last_selection.counts.tolist() == handle.last_selection.num_tokens.tolist()
    assert torch.equal(out, base)
    # a recipe of zero deletions keeps every token too
    with framework.prune(model, "fitprune", budget=TOKENS, deletions=(0,) * LAYERS, tokens=TOKENS,
                         registry=REGISTRY), torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)


@pytest.mark.parametrize("reduction", [0.3, 0.6])
def test_fit_equals_the_official_fitting_loop(model, samples, reduction):
    recipe = fit_fitprune(model, samples, reduction, pick="last", registry=REGISTRY)
    scheme, probes = reference_search(model, samples, reduction, prune_last_layer=False)
    assert list(recipe.deletions) == scheme
    assert list(recipe.probes) == probes
    assert recipe.alpha == probes[-1][0] and recipe.reached == probes[-1][1]


def test_bisection_equals_a_brute_force_sweep_of_its_grid(model, samples):
    reduction = 0.5
    flops = FlopModel(model.config.text_config.hidden_size, model.config.text_config.intermediate_size, LAYERS)
    recorded = [run_fit_pass(model, s, LAYERS, registry=REGISTRY) for s in samples]
    grid = 128  # the bisection's probes are multiples of 1/128 (7 halvings of [0, 1] to a bracket <= 0.01)

    def at(k):
        runs = [run_fit_pass(model, s, LAYERS, totals, k / grid, REGISTRY)[1] for s, (_, _, totals) in zip(samples, recorded)]
        return fitprune_scheme(runs, [TOKENS] * len(samples), flops, reduction)

    sweep = [at(k) for k in range(1, grid + 1)]
    met = [reached for reached, _ in sweep]
    first = met.index(True)
    assert all(met[first:]), "the budget test must be monotone in alpha on this model for the bisection to apply"
    recipe = fit_fitprune(model, samples, reduction, registry=REGISTRY)
    assert recipe.alpha == (first + 1) / grid
    assert recipe.reached and list(recipe.deletions) == sweep[first][1]


def test_recipe_file_round_trips_and_drives_prune(model, samples, tmp_path):
    recipe = fit_fitprune(model, samples, 0.6, registry=REGISTRY)
    assert fit_fitprune(model, samples, 0.6, registry=REGISTRY) == recipe  # deterministic
    path = save_recipe(recipe, tmp_path / "fitprune.json")
    loaded = load_recipe(path)
    assert loaded == recipe
    params = recipe_params(loaded)
    assert params["budget"] == TOKENS - recipe.deletions[0]
    with framework.prune(model, "fitprune", registry=REGISTRY, **params) as handle, torch.no_grad():
        model(**samples[0])
    counts = [int(d.counts[0]) for d in handle.last_selection.drops]
    kept, want = TOKENS, []
    for layer, deleted in enumerate(recipe.deletions[:-1]):
        if layer == 0 or deleted:
            kept -= deleted
            want.append(kept)
    assert counts == want
    bad = tmp_path / "other.json"
    bad.write_text('{"method": "pdrop"}')
    with pytest.raises(ValueError, match="not a FitPrune recipe"):
        load_recipe(bad)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_multi_image_rows_are_the_eager_attention_and_batch_equals_alone(kind):
    """On Qwen (M-RoPE, two images in one sample, left padding): the first drop's ``prompt_attention`` and
    ``visual_attention`` are layer 0's eager attention rows of the prompt / each image's tokens to that image's tokens,
    and a FitPrune batch equals each sample alone (`check_batch_equals_each_sample_alone`, budget 3)."""
    from adapter_fixtures import SignalRecorder
    from qwen_fixtures import MIXED, batch, check_batch_equals_each_sample_alone, tiny_qwen

    model = tiny_qwen(kind, layers=4)
    recipe = "fitprune+placement.fitprune(deletions=[0, 1, 1, 0], tokens=6)"
    inputs, layouts = batch(MIXED)
    spy = SignalRecorder(framework.compose(recipe, registry=REGISTRY))
    with framework.prune(model, spy, budget=3, registry=REGISTRY), torch.no_grad():
        model(**inputs)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attention = model(**inputs, output_attentions=True).attentions[0]  # (B, H, L, L)
    finally:
        model.set_attn_implementation("sdpa")
    signals = spy.seen[0]
    row = 0
    for b, items in enumerate(layouts):
        for _, positions, _ in items:
            pos = torch.tensor(positions)
            n = pos.numel()
            torch.testing.assert_close(signals.visual_attention[row, :, :n, :n], attention[b][:, pos][:, :, pos], atol=1e-6, rtol=0)
            # the Qwen prompt span is the question after the sample's last image (not the template tokens)
            ids = inputs["input_ids"][b]
            last = max(p for _, ps, _ in items for p in ps)
            question = (torch.isin(ids, torch.tensor(MIXED[b].question)) & (torch.arange(ids.numel()) > last)).nonzero().flatten()
            got = signals.prompt_attention[row][:, : question.numel(), :n]
            torch.testing.assert_close(got, attention[b][:, question][:, :, pos], atol=1e-6, rtol=0)
            row += 1
    check_batch_equals_each_sample_alone(model, MIXED, recipe, "keep")
