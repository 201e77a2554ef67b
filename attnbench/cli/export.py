"""``attnbench export``: a model's inference form to torch.export and ONNX, checked and timed."""
from __future__ import annotations

from pathlib import Path

import click

from attnbench import registry
from attnbench.cli._common import _variant_or_fail, build_model, console, fail, parse_key_values, parse_run


@click.command("export")
@click.argument("run", default=registry.DEFAULT_VARIANT)
@click.option("--out", "stem", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write: OUT.pt2 and OUT.onnx.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The trained weights (attnbench train --save, a sweep's checkpoints/) [default: the seed's "
                   "initialisation].")
@click.option("--format", "formats", default="pt2,onnx", show_default=True,
              help="Comma-separated: pt2 (torch.export), onnx (needs the onnx extra).")
@click.option("--dataset", default="digits", show_default=True,
              help="The data set the model was built for (its image size, channels and classes).")
@click.option("--root", default=None, help="Local path, for data sets read from disk.")
@click.option("--data-option", "data_items", multiple=True, metavar="KEY=VALUE", help="A data set option (repeatable).")
@click.option("--arch", default=None, help="timm model name [default: the small ViT fitting the images].")
@click.option("--model-option", "model_items", multiple=True, metavar="KEY=VALUE",
              help="A timm model keyword (repeatable).")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1), help="The exported batch size.")
@click.option("--tolerance", default=1e-4, show_default=True, type=click.FloatRange(min=0),
              help="Refuse an export whose largest difference from eager PyTorch exceeds this x max(1, |output|).")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="Threads of every runtime timed "
                                                                         "[default: every core available].")
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(min=1), help="Timed blocks per runtime.")
@click.option("--seed", default=0, show_default=True, help="The data split and, without --checkpoint, the weights.")
def export_command(run: str, stem: Path, checkpoint, formats: str, dataset: str, root, data_items, arch, model_items,
                   batch: int, tolerance: float, threads, repeats: int, seed: int) -> None:
    """Export RUN (VARIANT[:KEY=VALUE,...]), castled where the variant castles, to torch.export
    (OUT.pt2) and ONNX (OUT.onnx); check each against eager PyTorch and time each beside it.

    Exit status: 0 every format exported within the tolerance; 2 a bad option, or a model that does
    not export or whose export disagrees (one line saying why; nothing is left behind)."""
    import torch

    from attnbench import export, models
    from attnbench.data import DataError, load_dataset
    from attnbench.paths import file_problem
    from attnbench.train import default_arch
    from attnbench.variant import parse_options

    chosen = [f.strip() for f in formats.split(",") if f.strip()]
    for fmt in chosen:
        if fmt not in export.FORMATS:
            fail(f"--format: unknown format '{fmt}' (expected {', '.join(export.FORMATS)})")
    if "onnx" in chosen and (missing := export.onnx_available()):
        fail(f"--format onnx: {missing}")
    for fmt in chosen:
        if problem := file_problem(stem.with_name(f"{stem.name}.{fmt}"), "for --out"):
            fail(f"--out: {problem}")
    name, options = parse_run(run)
    cls = _variant_or_fail(name).cls
    try:
        parse_options(cls, options)
    except ValueError as err:
        fail(str(err))
    data_options = parse_key_values(data_items, "--data-option")
    model_options = parse_key_values(model_items, "--model-option")
    try:
        splits = load_dataset(dataset, root=root, seed=seed, **data_options)
    except DataError as err:
        fail(str(err))
    arch = arch or default_arch(splits)
    model = build_model(arch, name, options, seed, splits, model_options, data_options)
    if checkpoint is not None:
        try:
            loaded = models.load_checkpoint(model, checkpoint)
        except models.ModelError as err:
            fail(f"--checkpoint: {err}")
        left = loaded["missing"] + loaded["mismatched"]
        if left or loaded["unexpected"]:
            example_key = (left or loaded["unexpected"])[0]
            fail(f"--checkpoint {checkpoint}: does not fit this model ({len(left)} weight(s) missing or of another "
                 f"shape, {len(loaded['unexpected'])} the model lacks, e.g. '{example_key}'); give the RUN, --arch "
                 f"and --model-option it was trained with")
    # real test images where there are enough (the outputs compared are then the model's own)
    example = splits.test.batch(torch.arange(batch))[0] if len(splits.test) >= batch else \
        torch.randn(batch, splits.in_chans, splits.img_size, splits.img_size)
    try:
        done = export.export_model(model, example, stem, chosen, tolerance=tolerance, threads=threads,
                                   repeats=repeats, name=f"variant '{name}'")
    except export.ExportRefused as err:
        fail(str(err))
    for item in done:
        console.print(f"{item.format}: {item.path} (largest difference from eager PyTorch {item.max_abs_diff:.2g}, "
                      f"allowed {item.tolerance:.2g})", highlight=False, markup=False)
    timing = ", ".join(f"{item.runtime} {item.latency_ms:.3g} ms (speed-up {item.eager_ms / item.latency_ms:.2f}x)"
                       for item in done)
    console.print(f"latency per forward, batch {batch}, {done[0].eager_ms:.3g} ms eager PyTorch; {timing} "
                  f"(medians of {repeats} interleaved blocks, this process)", highlight=False, markup=False)
