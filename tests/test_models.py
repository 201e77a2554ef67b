"""attnbench.models: timm ViTs with a variant in every attention slot, swapping, castling."""
from __future__ import annotations

import pytest
import timm
import torch

from attnbench import models
from attnbench.variant import AttentionVariant, variant_name
from attnbench_variants.castling import CastlingAttention


@pytest.mark.parametrize("variant,options", [
    ("softmax", {}),
    ("linear", {}),
    ("linear-angular", {}),
    ("castling", {"mask_schedule": "gate_linear", "schedule_end": 0.5}),
    ("identity", {}),
])
def test_create_model_puts_the_variant_everywhere(variant, options):
    model = models.create_model("vit_pico_patch2_8", variant, options, num_classes=7, in_chans=1, seed=0)
    layers = models.variant_layers(model)
    assert len(layers) == len(model.blocks) == 4
    assert all(variant_name(type(layer)) == variant for _, layer in layers)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 7)


def test_small_models_are_timm_models():
    for name in models.SMALL_MODELS:
        assert timm.is_model(name)
    model = timm.create_model("vit_pico_patch4_32", num_classes=3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_seed_gives_the_same_weights_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = models.create_model("vit_pico_patch2_8", "softmax", seed=5, in_chans=1)
    after = torch.rand(1)
    b = models.create_model("vit_pico_patch2_8", "softmax", seed=5, in_chans=1)
    assert torch.equal(after, expected)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_errors_name_the_problem():
    with pytest.raises(models.ModelError, match="did you mean 'vit_pico_patch4_32'"):
        models.create_model("vit_pico_patch4_31", "softmax")
    with pytest.raises(models.ModelError, match="attn_layer"):
        models.create_model("resnet18", "softmax")
    with pytest.raises(models.ModelError, match="never downloads"):
        models.create_model("vit_pico_patch4_32", "softmax", pretrained=True)
    with pytest.raises(ValueError, match="mask_schedul"):
        models.create_model("vit_pico_patch4_32", "castling", {"mask_schedul": "fixed"})


def test_swap_attention_keeps_qkv_and_proj():
    torch.manual_seed(0)
    model = timm.create_model("vit_pico_patch4_32", num_classes=4, qkv_bias=True).eval()
    x = torch.randn(2, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = model(x)
    report = models.swap_attention(model, "softmax")
    assert report.model is model and len(report.replaced) == 4
    assert report.new_keys == [] and report.dropped_keys == []
    torch.testing.assert_close(model(x), reference)          # timm Attention == softmax variant

    report = models.swap_attention(model, "castling", mask_schedule="fixed")
    assert all(isinstance(m, CastlingAttention) for _, m in models.variant_layers(model))
    assert report.new_keys == [f"blocks.{i}.attn.dconv.weight" for i in range(4)]
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert "blocks.0.attn.qkv.weight" in report.kept_keys and "blocks.0.attn.proj.bias" in report.kept_keys


def test_checkpoint_from_a_softmax_model_loads_into_castling(tmp_path):
    source = models.create_model("vit_pico_patch2_8", "softmax", seed=1, in_chans=1)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = models.create_model("vit_pico_patch2_8", "castling", checkpoint_path=path, in_chans=1, num_classes=3)
    report = model.attnbench_checkpoint
    assert "blocks.0.attn.dconv.weight" in report["missing"]
    assert report["mismatched"] == ["head.bias", "head.weight"]
    assert torch.equal(model.blocks[2].attn.qkv.weight, source.blocks[2].attn.qkv.weight)
    with pytest.raises(models.ModelError, match="does not exist"):
        models.create_model("vit_pico_patch2_8", "softmax", checkpoint_path=tmp_path / "nope.pth", in_chans=1)


def test_hooks_over_all_layers_and_castle():
    model = models.create_model("vit_pico_patch2_8", "castling", {"mask_schedule": "l1_ramp"}, in_chans=1, seed=0)
    models.set_progress(model, 0.5)
    model(torch.randn(2, 1, 8, 8))
    diag = models.diagnostics(model)
    assert set(diag) == {f"blocks.{i}.attn" for i in range(4)}
    assert all(0.0 < d["mask_density"] <= 1.0 and d["branch_ratio"] > 0 for d in diag.values())
    assert float(models.regularization(model).detach()) > 0
    assert models.castle(model) is model
    assert all(layer.castled for _, layer in models.variant_layers(model))
    model(torch.randn(2, 1, 8, 8))
    assert float(models.regularization(model)) == 0.0
    assert all(d == {"mask_density": 0.0, "branch_ratio": 0.0} for d in models.diagnostics(model).values())
    with pytest.raises(ValueError):
        models.set_progress(model, 1.5)
    assert isinstance(models.variant_layers(model)[0][1], AttentionVariant)
