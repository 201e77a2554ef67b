"""The registry: discovery through entry points, clear errors, and plugins that misbehave."""
from __future__ import annotations

import textwrap

import pytest
import torch
from click.testing import CliRunner

from attnbench import registry
from attnbench.cli import main
from attnbench.registry import VariantError, build_attention, get_variant, list_variants, variant_class

BUILTINS = {"softmax", "linear", "angular", "linear-angular", "castling", "castling-no-dwconv",
            "castling-no-aux", "castling-no-norm", "castling-faithful", "identity"}

PLUGIN_MODULE = '''
from attnbench import AttentionVariant

class TinyAttention(AttentionVariant):
    """A plugin variant that mixes nothing."""

    def attend(self, q, k, v, attn_mask):
        return v * 2

    def core_macs(self, num_tokens):
        return 0

NOT_A_VARIANT = 42
'''


def fake_distribution(root, dist, entry_points, module=None, source=PLUGIN_MODULE):
    """Write an installed distribution (dist-info + module) under ``root``, which is on sys.path."""
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[attnbench.variants]\n{lines}\n")
    if module:
        (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    yield tmp_path
    registry.refresh()


def test_builtins_come_through_the_entry_point_group():
    assert BUILTINS <= set(list_variants())
    assert BUILTINS == set(list_variants(registry.BUILTIN_DISTRIBUTION))
    for name in BUILTINS:
        assert registry.variant_info(name).distribution == "attnbench"


def test_unknown_name_suggests_the_closest():
    with pytest.raises(VariantError, match="did you mean 'softmax'"):
        get_variant("sofmax")


def test_a_plugin_is_listed_and_buildable(site):
    fake_distribution(site, "fakeplug", {"tiny-attn": "fakeplug_mod:TinyAttention"}, module="fakeplug_mod")
    assert "tiny-attn" in list_variants()
    assert registry.variant_info("tiny-attn").distribution == "fakeplug"
    layer = build_attention("tiny-attn", 16, 2)
    assert layer(torch.randn(1, 5, 16)).shape == (1, 5, 16)


def test_two_distributions_claiming_one_name(site):
    fake_distribution(site, "plug-a", {"dup-attn": "plug_a_mod:TinyAttention"}, module="plug_a_mod")
    fake_distribution(site, "plug-b", {"dup-attn": "plug_b_mod:TinyAttention"}, module="plug_b_mod")
    with pytest.warns(UserWarning, match="'plug-a'.*'plug-b'|'plug-b'.*'plug-a'"):
        list_variants()
    with pytest.raises(VariantError, match="claimed by") as err:
        get_variant("dup-attn")
    assert "plug-a" in str(err.value) and "plug-b" in str(err.value)
    assert get_variant("plug-b:dup-attn").__module__ == "plug_b_mod"


def test_a_plugin_claiming_a_builtin_name_is_ignored_with_a_warning(site):
    fake_distribution(site, "impostor", {"softmax": "impostor_mod:TinyAttention"}, module="impostor_mod")
    with pytest.warns(UserWarning, match="impostor"):
        cls = get_variant("softmax")
    assert cls.__module__ == "attnbench_variants.softmax"


def test_a_plugin_that_fails_to_import_breaks_only_itself(site):
    fake_distribution(site, "brokenplug", {"broken-attn": "brokenplug_mod:TinyAttention"}, module="brokenplug_mod",
                      source="raise ImportError('needs a missing library')\n")
    with pytest.raises(VariantError, match="brokenplug.*failed to load.*needs a missing library"):
        get_variant("broken-attn")
    assert build_attention("softmax", 16, 2) is not None


def test_a_plugin_that_is_not_a_variant(site):
    fake_distribution(site, "oddplug", {"odd-attn": "oddplug_mod:NOT_A_VARIANT"}, module="oddplug_mod")
    with pytest.raises(VariantError, match="oddplug.*not a subclass of attnbench.AttentionVariant"):
        get_variant("odd-attn")


def test_variants_command_lists_everything_and_survives_a_broken_plugin(site):
    fake_distribution(site, "brokenplug", {"broken-attn": "brokenplug_mod:TinyAttention"}, module="brokenplug_mod",
                      source="raise ImportError('needs a missing library')\n")
    result = CliRunner().invoke(main, ["variants"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in BUILTINS:
        assert name in result.output
    assert "brokenplug" in result.output and "failed to load" in result.output
    assert "Traceback" not in result.output


def test_register_variant_in_process():
    from attnbench import AttentionVariant, register_variant

    @register_variant(name="local-test-attn")
    class Local(AttentionVariant):
        """A local variant."""

        def attend(self, q, k, v, attn_mask):
            return v

        def core_macs(self, num_tokens):
            return 0

    try:
        assert get_variant("local-test-attn") is Local
        assert registry.variant_info("local-test-attn").distribution == registry.LOCAL_DISTRIBUTION
    finally:
        registry.unregister_variant("local-test-attn")
    assert "local-test-attn" not in list_variants()
    with pytest.raises(VariantError, match="no variant 'local-test-attn' is registered in-process"):
        registry.unregister_variant("local-test-attn")


def test_variant_class_binds_options_for_timm():
    cls = variant_class("castling", mask_schedule="gate_cosine", schedule_end=0.5)
    layer = cls(24, num_heads=3)
    assert layer.options.mask_schedule == "gate_cosine" and layer.options.schedule_end == 0.5
    assert cls(24, num_heads=3, schedule_end=0.7).options.schedule_end == 0.7
    with pytest.raises(ValueError, match="castling.*schedule_ned.*did you mean 'schedule_end'"):
        variant_class("castling", schedule_ned=0.5)
