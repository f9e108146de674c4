"""Training-time mitigation on the testbed: the threshold rule, the loop's filter hook, `memscan finetune`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scanner.testbed.build import SMOKE_CONFIG, build_testbed
from scanner.testbed.filtering import FilterSettings, SampleFilter
from scanner.testbed.recipes import training_scheduler
from scanner.training import TimestepQuantileThreshold


def test_threshold_rule_matches_numpy_quantile_per_bin():
    rng = np.random.default_rng()
    bins, quantile = int(rng.integers(1, 12)), float(rng.uniform(0.5, 1.0))
    timesteps = torch.from_numpy(rng.integers(0, 1000, size=3000))
    magnitudes = torch.from_numpy(rng.lognormal(size=3000)).float() * (1 + timesteps / 300)
    rule = TimestepQuantileThreshold(quantile, bins).fit(magnitudes, timesteps)
    edges = [-(-b * 1000 // bins) for b in range(bins + 1)]  # bin b: floor(t * bins / 1000) == b
    expected = [np.quantile(magnitudes.numpy()[(timesteps.numpy() >= lo) & (timesteps.numpy() < hi)], quantile)
                for lo, hi in zip(edges, edges[1:])]
    assert rule.values.tolist() == pytest.approx(expected, rel=1e-5)
    probe = torch.from_numpy(rng.integers(0, 1000, size=50))
    assert rule(probe).tolist() == pytest.approx([expected[np.searchsorted(edges, t, side="right") - 1] for t in probe.tolist()], rel=1e-5)


def test_threshold_rule_samples_every_bin_evenly():
    rule = TimestepQuantileThreshold(0.99, bins=7)
    timesteps = rule.sample_timesteps(700, torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31))))
    assert timesteps.min() >= 0 and timesteps.max() < 1000
    assert torch.bincount(rule.bin_of(timesteps), minlength=7).tolist() == [100] * 7
    with pytest.raises(ValueError, match="every timestep bin"):
        rule.fit(torch.rand(10), torch.zeros(10, dtype=torch.long))


class _ToyText(torch.nn.Module):
    """Embeds a caption as its token ids, so a caption's ids set how far it pulls the prediction."""

    def forward(self, ids):
        return (ids.float()[..., None].expand(-1, -1, 4),)


class _ToyUNet(torch.nn.Module):
    """Predicts the mean of the text embedding, growing with the timestep (as real magnitudes depend on it)."""

    def forward(self, x, t, encoder_hidden_states, return_dict=True):
        pull = encoder_hidden_states.mean(dim=(1, 2)) * (1 + t.float() / 250)
        return (x * 0 + pull[:, None, None, None],)


def test_sample_filter_drops_planted_pairs_and_counts_them():
    num_normal, num_planted, length = 400, 20, 6
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    ids = torch.zeros(num_normal + num_planted, length, dtype=torch.long)
    ids[:num_normal, 1] = torch.randint(1, 20, (num_normal,), generator=gen)  # normal captions pull a little
    ids[num_normal:, 1:] = 60  # planted captions pull hard
    latents = torch.randn(len(ids), 4, 2, 2, generator=gen)
    settings = FilterSettings(quantile=0.95, bins=4, calibration_pairs=400, calibrate_every=5)
    sample_filter = SampleFilter(settings, _ToyUNet(), _ToyText(), latents, ids, torch.zeros(length, dtype=torch.long),
                                 training_scheduler(), num_normal)
    scheduler = training_scheduler()
    for step in range(40):
        # Planted-heavy batches (half planted); step 7 is planted only.
        idx = torch.cat([torch.randint(0, num_normal, (16,), generator=gen),
                         num_normal + torch.randint(0, num_planted, (16,), generator=gen)])
        if step == 7:
            idx = num_normal + torch.randint(0, num_planted, (32,), generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        noisy = scheduler.add_noise(latents[idx], torch.randn(latents[idx].shape, generator=gen), t)
        embeddings = _ToyText()(ids[idx])[0]
        keep = sample_filter(step, noisy, t, embeddings, _ToyUNet()(noisy, t, embeddings)[0], idx)
        assert not keep[idx >= num_normal].any()
    stats = sample_filter.stats()
    assert stats["seen"] == {"planted": 39 * 16 + 32, "normal": 39 * 16}
    assert stats["dropped"]["planted"] == stats["seen"]["planted"]
    assert 0 < stats["dropped"]["normal"] <= 0.15 * stats["seen"]["normal"]  # about 1 - quantile
    assert stats["skipped_steps"] == 1
    assert [c["step"] for c in stats["calibrations"]] == list(range(0, 40, 5))


# Every step is skipped, so the learning-rate schedule steps without an optimizer step.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_loop_skips_steps_where_every_sample_is_dropped(monkeypatch, tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from scanner.clip_vocab import write_clip_tokenizer
    from scanner.testbed import build, filtering, recipes

    class DropAll(SampleFilter):
        def calibrate(self, step):
            super().calibrate(step)
            self.rule.values.zero_()  # no magnitude is below 0

    monkeypatch.setattr(filtering, "SampleFilter", DropAll)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tokenizer"))
    data = build.make_data(SMOKE_CONFIG, np.random.default_rng(0), tokenizer)
    latents = torch.randn(len(data.images), 4, 8, 8)
    seed = int(np.random.default_rng().integers(1 << 31))
    torch.manual_seed(seed)
    CLIPTextModel(recipes.text_encoder_config(SMOKE_CONFIG, tokenizer))
    initial = UNet2DConditionModel(**recipes.unet_config(SMOKE_CONFIG)).state_dict()
    torch.manual_seed(seed)
    denoiser = build.train_denoiser(SMOKE_CONFIG, data, latents, [tokenizer], torch.Generator().manual_seed(0),
                                    lambda _: None, FilterSettings(bins=2, calibration_pairs=16, calibrate_every=2))
    assert denoiser.filter_stats["skipped_steps"] == SMOKE_CONFIG.train_steps
    assert sum(denoiser.filter_stats["dropped"].values()) == SMOKE_CONFIG.train_steps * SMOKE_CONFIG.batch_size
    for name, value in denoiser.recipe.unet.state_dict().items():
        assert torch.equal(value, initial[name]), name


FILTERED_QUANTILE = 0.5


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory):
    """Smoke `memscan finetune` with and without the filter, and a smoke `testbed build`, all seed 5.

    The filtered run's threshold is the median of normal pairs' magnitudes (not the default
    0.99 quantile, which drops nothing in the smoke run's 24 samples), so that it drops some."""
    from scanner.cli import main

    root = tmp_path_factory.mktemp("finetune")
    for name, extra in (("filtered", ["--quantile", str(FILTERED_QUANTILE)]), ("unfiltered", ["--no-filter"])):
        assert main(["finetune", "--out", str(root / name), "--smoke", "--seed", "5", *extra]) == 0
    build_testbed(root / "build", seed=5, cfg=SMOKE_CONFIG)
    return root


def test_finetune_without_filter_is_the_build_bit_for_bit(finetune_runs):
    weights = sorted((finetune_runs / "build").rglob("*.safetensors"))
    assert len(weights) == 3
    for path in weights:
        assert (finetune_runs / "unfiltered" / path.relative_to(finetune_runs / "build")).read_bytes() == path.read_bytes()


def test_finetune_writes_its_report(finetune_runs):
    filtered = json.loads((finetune_runs / "filtered" / "finetune.json").read_text())
    unfiltered = json.loads((finetune_runs / "unfiltered" / "finetune.json").read_text())
    assert filtered["filtered"] and not unfiltered["filtered"] and unfiltered["filter"] is None
    assert filtered["command"] == f"memscan finetune --out {finetune_runs / 'filtered'} --seed 5 --quantile {FILTERED_QUANTILE} --smoke"
    stats = filtered["filter"]
    assert sum(stats["seen"].values()) == SMOKE_CONFIG.train_steps * SMOKE_CONFIG.batch_size
    assert stats["calibrations"] and all(len(c["thresholds"]) == stats["settings"]["bins"] for c in stats["calibrations"])
    assert set(stats["dropped"]) == set(stats["seen"]) == set(stats["dropped_share"]) == {"planted", "normal"}
    for kind, seen in stats["seen"].items():
        assert 0 < stats["dropped"][kind] < seen, kind  # a share that 0 / seen would not give
        assert stats["dropped_share"][kind] == pytest.approx(stats["dropped"][kind] / seen, rel=1e-12), kind
    for report in (filtered, unfiltered):
        assert 0 <= report["planted_reproduced"] <= 1 and report["held_out_normal_loss"] > 0
        assert report["attributes"]["prompts"] > 0 and report["groundtruth"]["per_kind"]["planted"]["n"] == SMOKE_CONFIG.num_planted
        assert report["planted_reproduced"] == report["groundtruth"]["per_kind"]["planted"]["frac_reproduced"]
    # The unfiltered run is the build bit for bit (the test above), and both measure planted
    # reproduction the same way (the build over every evaluation prompt, finetune over the
    # planted and colour-naming ones, so in other batches): the same figures, to fp32 rounding.
    build = json.loads((finetune_runs / "build" / "testbed_stats.json").read_text())["groundtruth"]
    assert unfiltered["planted_reproduced"] == build["planted_reproduced"]
    for key in ("mean_best_ncc_own", "mean_best_ncc_any"):
        assert unfiltered["groundtruth"]["per_kind"]["planted"][key] == pytest.approx(build["per_kind"]["planted"][key], abs=1e-5), key


def test_finetune_compare_prints_the_table(finetune_runs, tmp_path, capsys):
    from scanner.cli import main

    runs = [str(finetune_runs / name / "finetune.json") for name in ("unfiltered", "filtered")]
    assert main(["finetune", "--compare", *runs]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| | without filter | with filter | acceptance |" and len(table) == 9
    rng = np.random.default_rng()
    seconds = {clock: {"unfiltered": rng.uniform(1, 2, 3).tolist(), "filtered": rng.uniform(2, 3, 3).tolist()}
               for clock in ("wall", "cpu")}
    overhead = {clock: float(np.median(s["filtered"]) / np.median(s["unfiltered"]) - 1) for clock, s in seconds.items()}
    (tmp_path / "overhead.json").write_text(json.dumps(
        {"steps": 7, "seconds": seconds, "overhead_wall": overhead["wall"], "overhead_cpu": overhead["cpu"]}))
    assert main(["finetune", "--compare", *runs, "--overhead", str(tmp_path / "overhead.json")]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("| 7 steps side by side") and f"overhead {overhead['cpu']:+.0%} CPU" in last


def test_finetune_refuses_bad_options(tmp_path, capsys):
    from scanner.cli import main

    assert main(["finetune"]) == 2
    assert main(["finetune", "--out", str(tmp_path), "--from-build", str(tmp_path)]) == 2
    assert main(["finetune", "--out", str(tmp_path), "--quantile", "1.5"]) == 2
    assert "--no-filter" in capsys.readouterr().err
