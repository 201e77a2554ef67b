"""Library code leaves the caller's global state alone: random generators, log levels, the
process environment, thread counts and the plugin classes the registry loads."""
import logging
import os

import torch

from attnbench import bench, data, measure, models, registry, testing, train


def _loggers() -> dict[str, int]:
    return {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
            if isinstance(logger, logging.Logger)}


def test_time_interleaved_sets_no_log_level_and_restores_threads():
    levels, threads = _loggers(), torch.get_num_threads()
    measure.time_interleaved({"id": (torch.nn.Identity(), torch.zeros(2))}, threads=1, warmup=1, repeats=2,
                             min_block_ms=0.1)
    after = _loggers()
    assert {name: level for name, level in after.items() if levels.get(name, logging.NOTSET) != level} == {}
    assert torch.get_num_threads() == threads


def test_bench_builds_and_times_without_touching_the_global_generator():
    state = torch.get_rng_state()
    bench.build_module("layer", "softmax", 48, 3, 17)
    bench.build_module("model", "linear", 48, 3, 17, depth=1, patch=2)
    assert torch.equal(torch.get_rng_state(), state)


def test_fit_restores_the_random_state_and_the_environment():
    splits = data.load_dataset("digits", seed=0)
    model = models.create_model("vit_pico_patch2_8", "softmax", seed=0, num_classes=splits.num_classes,
                                in_chans=splits.in_chans, img_size=splits.img_size, embed_dim=16, depth=1,
                                num_heads=2)
    environment, state = dict(os.environ), torch.get_rng_state()
    train.fit(model, splits, train.TrainConfig(epochs=1, max_steps=2, batch_size=32, device="cpu",
                                               deterministic=True), progress=False)
    assert dict(os.environ) == environment
    assert torch.equal(torch.get_rng_state(), state)


def test_conformance_checks_leave_the_global_generator_alone():
    state = torch.get_rng_state()
    results = testing.run_checks("softmax")
    assert all(r.passed for r in results), [r for r in results if not r.passed]
    assert torch.equal(torch.get_rng_state(), state)


def test_the_registry_does_not_write_onto_the_classes_it_loads(registered):
    from attnbench.variant import AttentionVariant, variant_name

    class Plain(AttentionVariant):
        """A variant the registry must leave as its author wrote it."""

        def attend(self, q, k, v, attn_mask):
            return v

        def core_macs(self, num_tokens):
            return 0

    before = dict(vars(Plain))
    name = registered(Plain, "plain-test-attn")
    assert registry.get_variant(name) is Plain
    assert dict(vars(Plain)) == before
    assert variant_name(Plain) == "plain-test-attn"
