"""optimize() on transformers models built from small configs (random weights, no downloads):
outputs of the same type and equal, and the pointwise convs and chains found."""

import pytest
import torch
import transformers  # the dev extra's: pure Python, installs beside the CPU torch build

import convrewrite


def squeezebert():
    config = transformers.SqueezeBertConfig(vocab_size=100, hidden_size=32, embedding_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, q_groups=2, k_groups=2,
                                            v_groups=2, intermediate_groups=2, output_groups=2)
    return transformers.SqueezeBertModel(config).eval(), (torch.randint(0, 100, (2, 16)),)


def convnext():
    config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1])
    return transformers.ConvNextModel(config).eval(), (torch.randn(1, 3, 32, 32),)


@pytest.mark.parametrize("build, part, sites", [
    (squeezebert, None, 16),  # 8 pointwise convs a layer
    (squeezebert, "encoder", 16),
    (convnext, None, 2),  # one channels-last chain a block
])
def test_transformers_models_keep_their_outputs_and_sites_are_found(build, part, sites):
    torch.manual_seed(0)
    model, inputs = build()
    if part == "encoder":  # a part of the model, optimized in place: model.encoder = optimize(model.encoder)
        model.encoder = convrewrite.optimize(model.encoder, measure=False)
        optimized = model
    else:
        optimized = convrewrite.optimize(model, measure=False)
    with torch.no_grad():
        out = optimized(*inputs)
        again = optimized(*inputs)
    reference_model = build()[0]
    reference_model.load_state_dict(model.state_dict())  # strict: the state-dict keys are unchanged
    with torch.no_grad():
        reference = reference_model(*inputs)
    assert type(out) is type(reference) and type(again) is type(reference) and out.keys() == reference.keys()
    for key in reference.keys():
        torch.testing.assert_close(out[key], reference[key], rtol=1e-4, atol=1e-5)
    report = (model.encoder if part else optimized).report
    assert report is not None and len(report) >= sites
