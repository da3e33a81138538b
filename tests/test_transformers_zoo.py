"""optimize() across transformers architectures from small configs (random weights, no
downloads), with every rewrite made (the suite's fake clock): no crash, outputs of the same
type and equal, the gradients of a training step equal, and optimizing twice works. The
architectures here have no pointwise conv to find or spell their sites as the ones in
test_real_models.py do; what they test is that capture and rewriting survive their code."""

import copy

import pytest
import torch
import transformers

import convrewrite

TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64)
VISION = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37)
STAGES = dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1])

# name: (model class, config class, config, input kind, sites at least)
ZOO = {
    "bert": ("BertModel", "BertConfig", TEXT, "text", 0),
    "gpt2": ("GPT2Model", "GPT2Config", dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64), "text", 0),
    "llama": ("LlamaModel", "LlamaConfig", dict(TEXT, num_key_value_heads=2), "text", 0),
    "t5-encoder": ("T5EncoderModel", "T5Config", dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                                       num_heads=4), "text", 0),
    "vit": ("ViTModel", "ViTConfig", VISION, "image", 0),
    "swin": ("SwinModel", "SwinConfig", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                             num_heads=[2, 2], window_size=4), "image", 1),
    "convnextv2": ("ConvNextV2Model", "ConvNextV2Config", STAGES, "image", 2),
    "resnet": ("ResNetModel", "ResNetConfig", dict(STAGES, embedding_size=8), "image", 5),
    "regnet": ("RegNetModel", "RegNetConfig", dict(STAGES, embedding_size=8, groups_width=8), "image", 10),
    "mobilevitv2": ("MobileViTV2Model", "MobileViTV2Config", dict(image_size=64, width_multiplier=0.25), "image", 54),
    "segformer": ("SegformerModel", "SegformerConfig", dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                                            hidden_sizes=[8, 16], num_attention_heads=[1, 2],
                                                            patch_sizes=[7, 3], strides=[4, 2]), "image", 3),
    "poolformer": ("PoolFormerModel", "PoolFormerConfig", dict(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[8, 16],
                                                               patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1]),
                   "image", 4),
    "levit": ("LevitModel", "LevitConfig", dict(image_size=64, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3],
                                                depths=[1, 1, 1], key_dim=[8, 8, 8]), "image", 1),
    "focalnet": ("FocalNetModel", "FocalNetConfig", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                         focal_levels=[2, 2]), "image", 6),
    "hubert": ("HubertModel", "HubertConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=37, conv_dim=(16, 16), conv_stride=(5, 2),
                                                   conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                                   num_conv_pos_embedding_groups=4), "audio", 1),
}


def build(name):
    model_class, config_class, fields, kind, _ = ZOO[name]
    config = getattr(transformers, config_class)(**fields)
    for field, value in vars(config).items():  # random masking and dropout would differ between two runs
        if isinstance(value, float) and ("drop" in field or (field.startswith("mask_") and field.endswith("_prob"))):
            setattr(config, field, 0.0)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    size = 64 if getattr(config, "image_size", 32) == 64 else 32
    inputs = {"text": {"input_ids": torch.randint(1, 99, (2, 16), generator=generator)},
              "image": {"pixel_values": torch.randn(2, 3, size, size, generator=generator)},
              "audio": {"input_values": torch.randn(2, 800, generator=generator)}}[kind]
    return getattr(transformers, model_class)(config), inputs


def assert_equal(out, reference):
    assert type(out) is type(reference) and list(out.keys()) == list(reference.keys())
    for key, value in reference.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(out[key], value, rtol=1e-4, atol=1e-5)
            assert out[key].stride() == value.stride()


@pytest.mark.parametrize("name", list(ZOO))
def test_transformers_architectures_survive_every_rewrite(name):
    model, inputs = build(name)
    model.eval()
    with torch.no_grad():
        reference = model(**inputs)
        optimized = convrewrite.optimize(model)
        assert_equal(optimized(**inputs), reference)
        assert_equal(optimized(**inputs), reference)
        assert_equal(convrewrite.optimize(optimized)(**inputs), reference)
    report = optimized.report
    assert report is not None and len(report.rewritten) >= ZOO[name][-1], report

    plain = copy.deepcopy(model).train()
    trained = convrewrite.optimize(copy.deepcopy(plain))
    for _ in range(2):  # the first call specialises, the second runs the rewritten graph
        for module in (plain, trained):
            module.zero_grad()
            module(**inputs)[0].square().mean().backward()
        for (path, p), q in zip(plain.named_parameters(), trained.parameters(), strict=True):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=lambda m, path=path: f"{path}: {m}")
