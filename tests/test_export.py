"""``attnbench export``: every built-in variant's inference form to torch.export and ONNX, within
tolerance of eager PyTorch; a model that does not export, or a checkpoint that does not fit, is
refused in one line and leaves nothing behind."""
from __future__ import annotations

from typing import Optional

import pytest
import torch
from click.testing import CliRunner

from attnbench import models, registry
from attnbench.cli import main
from attnbench.export import FORMATS, ExportRefused, export_model, onnx_available
from attnbench.variant import AttentionVariant

pytestmark = [pytest.mark.slow,   # every variant exported twice: about a minute
              pytest.mark.skipif(onnx_available() is not None, reason=str(onnx_available()))]


def _model(variant: str, **options):
    return models.create_model("vit_pico_patch2_8", variant, options, seed=0, depth=1, num_classes=10, in_chans=1,
                               img_size=8)


@pytest.mark.parametrize("variant", registry.list_variants("attnbench"))
def test_every_built_in_variant_exports_within_tolerance(variant, tmp_path):
    x = torch.randn(2, 1, 8, 8)
    model = _model(variant)
    with torch.no_grad():
        eager = models.castle(_model(variant)).eval()(x)
    done = export_model(model, x, tmp_path / variant, threads=1, repeats=1, name=f"variant '{variant}'")
    assert [d.format for d in done] == list(FORMATS)
    for item in done:
        assert item.path.stat().st_size > 0 and item.max_abs_diff <= 1e-5, (item.format, item.max_abs_diff)
        assert item.latency_ms > 0 and item.eager_ms > 0
    # what was written runs alone, and gives eager's output
    program = torch.export.load(str(tmp_path / f"{variant}.pt2")).module()
    assert torch.allclose(program(x), eager, atol=1e-5)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / f"{variant}.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(out), eager, atol=1e-5)


class _DataDependent(AttentionVariant):
    """Branches in Python on a tensor's value: torch.export cannot trace it."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if float(v.detach().sum()) > 0:
            return v
        return -v

    def core_macs(self, num_tokens: int) -> int:
        return 0


def test_a_model_that_does_not_export_is_refused_in_one_line(registered, tmp_path):
    name = registered(_DataDependent, "data-dependent")
    with pytest.raises(ExportRefused, match="variant 'data-dependent' does not export to pt2: "):
        export_model(_model(name), torch.randn(1, 1, 8, 8), tmp_path / "m", name=f"variant '{name}'", repeats=1)
    assert list(tmp_path.iterdir()) == [], "nothing is left behind"


def test_the_command_exports_a_trained_checkpoint_and_refuses_one_that_does_not_fit(tmp_path):
    weights = tmp_path / "c.safetensors"
    trained = CliRunner().invoke(main, ["train", "castling", "--epochs", "1", "--max-steps", "2", "--num-threads", "1",
                                        "--no-progress", "--model-option", "depth=1", "--save", str(weights)])
    assert trained.exit_code == 0, trained.output
    out = CliRunner().invoke(main, ["export", "castling", "--checkpoint", str(weights), "--model-option", "depth=1",
                                    "--out", str(tmp_path / "x" / "castling"), "--threads", "1", "--repeats", "2"],
                             env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert {p.name for p in (tmp_path / "x").iterdir()} == {"castling.pt2", "castling.onnx"}
    assert "largest difference from eager PyTorch" in out.output and "onnxruntime" in out.output
    assert "speed-up" in out.output
    refused = CliRunner().invoke(main, ["export", "castling", "--checkpoint", str(weights), "--model-option", "depth=2",
                                        "--out", str(tmp_path / "y" / "m")])
    lines = refused.output.strip().splitlines()
    assert refused.exit_code == 2 and len(lines) == 1 and "does not fit this model" in lines[0], refused.output
    assert not (tmp_path / "y").exists()
    unknown = CliRunner().invoke(main, ["export", "castling", "--format", "tflite", "--out", str(tmp_path / "z")])
    assert unknown.exit_code == 2 and "unknown format 'tflite'" in unknown.output
