"""optimize() on transformers models built from small configs (random weights, no downloads):
outputs of the same type and equal, and the pointwise convs and chains found and rewritten
(the fake clock makes every rewrite win)."""

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


def convbert():
    config = transformers.ConvBertConfig(vocab_size=100, hidden_size=32, embedding_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, conv_kernel_size=3)
    return transformers.ConvBertModel(config).eval(), (torch.randint(0, 100, (2, 16)),)


def mobilevit():
    config = transformers.MobileViTConfig(image_size=64, hidden_sizes=[16, 24, 32], num_attention_heads=2,
                                          neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64])
    return transformers.MobileViTModel(config).eval(), (torch.randn(1, 3, 64, 64),)


def wav2vec2():
    config = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                         conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    return transformers.Wav2Vec2Model(config).eval(), (torch.randn(2, 800),)


def whisper():
    config = transformers.WhisperConfig(vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=1,
                                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                                        decoder_ffn_dim=37, num_mel_bins=16, max_source_positions=50,
                                        max_target_positions=20, pad_token_id=0, decoder_start_token_id=1,
                                        bos_token_id=1, eos_token_id=2)
    return transformers.WhisperModel(config).eval(), (torch.randn(1, 16, 100), None, torch.tensor([[1, 2]]))


def mamba():
    config = transformers.MambaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, state_size=8, conv_kernel=4)
    return transformers.MambaModel(config).eval(), (torch.randint(0, 99, (2, 16)),)


def pointwise_convs(model):
    return sum(isinstance(m, torch.nn.modules.conv._ConvNd) and set(m.kernel_size) == {1} for m in model.modules())


@pytest.mark.parametrize("build, part, sites", [
    (squeezebert, None, 16),  # 8 pointwise convs a layer
    (squeezebert, "encoder", 16),
    (convnext, None, 2),  # one channels-last chain a block
    (convbert, None, 2),  # the pointwise half of each layer's separable conv
    (mobilevit, None, 21),  # every pointwise conv, those inside its unfold-and-attend blocks too
    (wav2vec2, None, 1),  # no pointwise conv; transpose -> LayerNorm, an open chain (the LayerNorm has two users)
    (whisper, None, 0),  # nothing to find; its decoder's embedding read once hung the loop finder
    (mamba, None, 2),  # transpose -> Linear in each layer; its associative scan holds vmap's values
])
def test_transformers_models_keep_their_outputs_and_sites_are_found(build, part, sites):
    torch.manual_seed(0)
    model, inputs = build()
    if part == "encoder":  # a part of the model, optimized in place: model.encoder = optimize(model.encoder)
        model.encoder = convrewrite.optimize(model.encoder, measure=True)
        optimized = model
    else:
        optimized = convrewrite.optimize(model, measure=True)
    with torch.no_grad():
        out = optimized(*inputs)
        again = optimized(*inputs)
    reference_model = build()[0]
    reference_model.load_state_dict(model.state_dict())  # strict: the state-dict keys are unchanged
    with torch.no_grad():
        reference = reference_model(*inputs)
    assert type(out) is type(reference) and type(again) is type(reference) and out.keys() == reference.keys()
    for key in reference.keys():
        if isinstance(reference[key], torch.Tensor):
            torch.testing.assert_close(out[key], reference[key], rtol=1e-4, atol=1e-5)
        else:  # a decoder's cache
            assert type(out[key]) is type(reference[key])
    report = (model.encoder if part else optimized).report
    assert report is not None and len(report) >= sites and len(report.rewritten) >= sites
    assert sum(site.pattern == "pointwise conv" for site in report) == pointwise_convs(model)
