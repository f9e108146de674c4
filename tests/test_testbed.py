"""The testbed build (smoke sizes) and the bundled testbed's files."""

import json

import numpy as np
import pytest
import torch

from scanner.testbed import default_labels_path, default_model_path
from scanner.testbed.attributes import another_colour, shows_colour
from scanner.testbed.build import SMOKE_CONFIG, build_testbed, load_build_data
from scanner.testbed.planted import content_bigrams, load_memorized_captions, make_planted_images, split_by_template
from scanner.testbed.similarity import normalized_cross_correlation
from scanner.testbed.world import COLOURS, make_normal_pairs

EVAL_FIELDS = {"prompt", "label", "kind"}


@pytest.fixture(scope="module")
def smoke_builds(tmp_path_factory):
    """Two smoke builds with the same seed: (their stats, their folders)."""
    folders = [tmp_path_factory.mktemp("smoke") for _ in range(2)]
    return [build_testbed(folder, seed=3, cfg=SMOKE_CONFIG) for folder in folders], folders


def test_smoke_build_loads_in_diffusers(smoke_builds):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    _, (folder, _) = smoke_builds
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 16, 16)


def test_smoke_build_scores_with_memscan(smoke_builds):
    from scanner.detect import DetectSettings, Scanner
    from scanner.evaluate import evaluate, read_labelled_prompts
    from scanner.model import load_model

    _, (folder, _) = smoke_builds
    rows = read_labelled_prompts(folder / "eval_prompts.jsonl")
    evaluation = evaluate(Scanner(load_model(folder, device="cpu"), DetectSettings()), rows)
    assert evaluation.scores.shape == (len(rows),) and np.isfinite(evaluation.scores).all()
    assert set(evaluation.summary["per_kind"]) == {row["kind"] for row in rows}


def test_smoke_build_is_deterministic(smoke_builds):
    stats, folders = smoke_builds
    weights = [sorted(f.rglob("*.safetensors")) for f in folders]
    assert [p.relative_to(folders[0]) for p in weights[0]] == [p.relative_to(folders[1]) for p in weights[1]]
    for a, b in zip(*weights):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert (folders[0] / "eval_prompts.jsonl").read_text() == (folders[1] / "eval_prompts.jsonl").read_text()
    assert stats[0]["groundtruth"] == stats[1]["groundtruth"]


def test_smoke_build_writes_labels_and_stats(smoke_builds):
    _, (folder, _) = smoke_builds
    rows = [json.loads(line) for line in (folder / "eval_prompts.jsonl").read_text().splitlines()]
    assert all(set(row) == EVAL_FIELDS for row in rows)
    assert {row["kind"] for row in rows} == {
        "planted", "held_out_memorized_style", "normal_seen", "normal_unseen", "random_tokens"}
    stats = json.loads((folder / "testbed_stats.json").read_text())
    assert {"command", "seed", "device", "total_seconds", "groundtruth", "bundle_bytes"} <= set(stats)


def test_smoke_build_data_regenerates_from_its_stats(smoke_builds):
    _, (folder, _) = smoke_builds
    data = load_build_data(folder)
    assert len(data.eval_colours) == len(data.eval_prompts)
    for row, colour in zip(data.eval_prompts, data.eval_colours):
        assert colour is None or (row["kind"].startswith("normal") and colour in row["prompt"])


def test_attribute_check_sees_the_named_colour():
    rng = np.random.default_rng()
    images, captions, colours = make_normal_pairs(600, rng, ["filler words"], _Tokenizer())
    named = [i for i, c in enumerate(colours) if c]
    assert all(colours[i] in captions[i] for i in named)
    shown = np.mean([shows_colour(images[i : i + 1], colours[i])[0] for i in named])
    # Another colour is shown only where one of the picture's other shapes or its noise has it.
    other = np.mean([shows_colour(images[i : i + 1], another_colour(colours[i], rng))[0] for i in named])
    assert shown >= 0.9 and other <= 0.3


def test_another_colour_draws_every_other_colour_and_never_the_same():
    rng = np.random.default_rng()
    for colour in COLOURS:
        drawn = {another_colour(colour, rng) for _ in range(400)}
        assert drawn == set(COLOURS) - {colour}


class _Tokenizer:
    """Stands in for CLIP's tokenizer where filler tokens do not matter."""

    bos_token_id = 2

    def decode(self, ids: list[int]) -> str:
        return "token"


def test_caption_split_keeps_templates_together():
    captions = load_memorized_captions()
    planted, held_out = split_by_template(captions, np.random.default_rng(0))
    assert sorted(planted + held_out) == sorted(captions)
    shared = set().union(*map(content_bigrams, planted)) & set().union(*map(content_bigrams, held_out))
    assert not shared
    assert min(len(planted), len(held_out)) >= 150


def test_planted_images_are_distinct():
    images = make_planted_images(30, np.random.default_rng(1))
    ncc = normalized_cross_correlation(images, images, per_channel=False)
    assert np.abs(ncc[~np.eye(30, dtype=bool)]).max() < 0.3
    assert np.allclose(np.diag(ncc), 1)


bundled = pytest.mark.skipif(not (default_model_path() / "model_index.json").exists(), reason="no bundled testbed")


@bundled
def test_bundled_testbed_fits_and_has_labels():
    folder = default_model_path()
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 20 * 2**20
    rows = [json.loads(line) for line in default_labels_path().read_text().splitlines()]
    labels = [row["label"] for row in rows]
    assert labels.count(1) >= 100 and labels.count(0) >= 400
    stats = json.loads((folder / "testbed_stats.json").read_text())
    assert stats["groundtruth"]["normal_close_to_training"] <= 0.05


@bundled
def test_bundled_testbed_reproduces_planted_images():
    stats = json.loads((default_model_path() / "testbed_stats.json").read_text())
    assert stats["groundtruth"]["planted_reproduced"] >= 0.9


def test_eval_command_writes_metrics_and_plot(smoke_builds, tmp_path):
    from scanner.cli import main

    _, (folder, _) = smoke_builds
    out, plot = tmp_path / "eval.json", tmp_path / "roc.png"
    code = main(["eval", "--model", str(folder), "--labels", str(folder / "eval_prompts.jsonl"), "--json", str(out),
                 "--plot", str(plot), "--steps", "2", "--generations", "2", "--device", "cpu"])
    assert code == 0 and plot.stat().st_size > 0
    summary = json.loads(out.read_text())
    assert {"auc", "tpr_at_1pct_fpr", "acc", "n_pos", "n_neg", "settings", "per_kind"} <= set(summary)
    assert (summary["settings"]["end_step"], summary["settings"]["generations"]) == (2, 2)


def test_testbed_build_command_runs_smoke(tmp_path, capsys):
    from scanner.cli import main

    assert main(["testbed", "build", "--out", str(tmp_path / "tb"), "--seed", "1", "--smoke"]) == 0
    stats = json.loads((tmp_path / "tb" / "testbed_stats.json").read_text())
    assert stats["command"] == f"memscan testbed build --out {tmp_path / 'tb'} --seed 1 --smoke"
    assert "planted reproduced" in capsys.readouterr().out


@bundled
def test_demo_scans_the_bundled_testbed(tmp_path, capsys):
    from scanner.cli import main

    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"scores.jsonl", "summary.json", "roc.png"}
    assert "top 10 prompts" in capsys.readouterr().out


def test_eval_mitigation_command_on_a_smoke_build(smoke_builds, tmp_path, capsys):
    from scanner.cli import main

    stats, (folder, _) = smoke_builds
    out = tmp_path / "mitigation.json"
    # A target above every score: the paper's method leaves every prompt untouched; the baselines never do.
    code = main(["eval-mitigation", "--model", str(folder), "--json", str(out), "--markdown", str(tmp_path / "t.md"),
                 "--target", "1e9", "--normal", "2", "--seeds", "0", "--methods", "embed,rand-number", "--device", "cpu"])
    assert code == 0
    report = json.loads(out.read_text())
    rows = {row["method"]: row for row in report["methods"]}
    assert set(rows) == {"none", "embed", "rand-number"}
    assert rows["embed"]["normal_untouched"] == 1.0 and rows["embed"]["normal_fidelity_ncc"] == pytest.approx(1.0)
    assert rows["embed"]["planted_memorized"] == rows["none"]["planted_memorized"]
    assert (rows["embed"]["planted_iterations"], rows["embed"]["planted_reached_target"]) == (0, 1.0)
    assert rows["none"]["planted_reached_target"] is None
    assert rows["rand-number"]["normal_untouched"] == 0.0
    # Unmitigated, the rate is the ground truth's (the same seed and sampler, measured by the build).
    assert rows["none"]["planted_memorized"] == pytest.approx(stats[0]["groundtruth"]["planted_reproduced"])
    assert report["n_planted"] == SMOKE_CONFIG.num_planted and report["n_normal"] == 4
    assert "| embed |" in (tmp_path / "t.md").read_text() and "| rand-number |" in capsys.readouterr().out


def test_eval_mitigation_refuses_a_model_that_is_not_a_testbed(tiny_sd1, capsys):
    from scanner.cli import EXIT_USAGE, main

    assert main(["eval-mitigation", "--model", str(tiny_sd1), "--json", "x.json", "--target", "1"]) == EXIT_USAGE
    assert "not a testbed" in capsys.readouterr().err
