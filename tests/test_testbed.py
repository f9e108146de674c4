"""The testbed build (smoke sizes) and the bundled testbed's files."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from scanner.testbed import default_labels_path, default_model_path
from scanner.testbed.attributes import another_colour, shows_colour
from scanner.errors import MemscanError
from scanner.testbed.build import SMOKE_CONFIG, build_config, build_testbed, load_build_data, make_data
from scanner.testbed.groundtruth import DDIM_SAMPLER, GROUNDTRUTH_LABELS, REPRODUCTION_THRESHOLD, generate, load_pipeline
from scanner.testbed.planted import content_bigrams, load_memorized_captions, make_planted_images, split_by_template
from scanner.testbed.similarity import normalized_cross_correlation
from scanner.testbed.world import COLOURS, make_normal_pairs

EVAL_FIELDS = {"prompt", "label", "kind"}


def _draw_seed() -> int:
    """A fresh seed from the OS's entropy (not from a global generator that fixtures may have seeded)."""
    return int(np.random.default_rng().integers(1 << 31))


def _sklearn_metrics(labels, scores) -> dict:
    """The summary's overall metrics, from scikit-learn, with scanner/metrics.py's conventions:
    TPR at the last point of sklearn's default ROC curve (drop_intermediate) with FPR < 1%,
    accuracy the best balanced accuracy over its points."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    fpr, tpr, _ = roc_curve(labels, scores)
    return {
        "auc": roc_auc_score(labels, scores),
        "tpr_at_1pct_fpr": tpr[np.where(fpr < 0.01)[0][-1]],
        "acc": np.max(1 - (fpr + (1 - tpr)) / 2),
        "n_pos": int((labels == 1).sum()),
        "n_neg": int((labels == 0).sum()),
    }


def _assert_metrics_match_sklearn(summary: dict, labels, scores, message: str = "") -> None:
    expected = _sklearn_metrics(labels, scores)
    assert (summary["n_pos"], summary["n_neg"]) == (expected["n_pos"], expected["n_neg"]), message
    for key in ("auc", "tpr_at_1pct_fpr", "acc"):
        assert summary[key] == pytest.approx(expected[key], abs=1e-9), f"{key}: {message}"


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
    seed = _draw_seed()
    rows = read_labelled_prompts(folder / "eval_prompts.jsonl")
    evaluation = evaluate(Scanner(load_model(folder, device="cpu"), DetectSettings(seed=seed)), rows)
    assert evaluation.scores.shape == (len(rows),) and np.isfinite(evaluation.scores).all()
    labels = np.array([row["label"] for row in rows])
    kinds = np.array([row["kind"] for row in rows])
    summary = evaluation.summary
    _assert_metrics_match_sklearn(summary, labels, evaluation.scores, f"seed {seed}")
    assert set(summary["per_kind"]) == set(kinds.tolist())
    for kind, entry in summary["per_kind"].items():
        mask = kinds == kind
        assert (entry["n"], entry["label"]) == (mask.sum(), labels[mask][0]), kind
        assert entry["mean_score"] == pytest.approx(evaluation.scores[mask].astype(np.float64).mean(), rel=1e-6), kind
        if entry["label"] == 0:  # this kind against every memorized prompt
            against = mask | (labels == 1)
            expected = _sklearn_metrics(labels[against], evaluation.scores[against])
            assert entry["auc_vs_positives"] == pytest.approx(expected["auc"], abs=1e-9), f"{kind}, seed {seed}"
            assert entry["tpr_at_1pct_fpr_vs_positives"] == pytest.approx(expected["tpr_at_1pct_fpr"], abs=1e-9), kind


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


def _own_ncc_float64(generated: np.ndarray, image: np.ndarray) -> float:
    """NCC of two [3, H, W] images, each channel centred, in float64 (the ground truth's rule, written out)."""
    a = generated.astype(np.float64) - generated.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    b = image.astype(np.float64) - image.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_groundtruth_labels_follow_each_planted_prompts_generations(smoke_builds):
    """groundtruth_labels.jsonl: the evaluation prompts in order, a planted one memorized iff a seed reproduced its image."""
    stats, (folder, _) = smoke_builds
    shipped = [json.loads(line) for line in (folder / "eval_prompts.jsonl").read_text().splitlines()]
    labelled = [json.loads(line) for line in (folder / GROUNDTRUTH_LABELS).read_text().splitlines()]
    assert [r["prompt"] for r in labelled] == [r["prompt"] for r in shipped]
    data = load_build_data(folder)
    planted = [i for i, row in enumerate(shipped) if row["kind"] == "planted"]
    # The build's own sampler, regenerated here; NCC in float64 against each prompt's own training image.
    images = generate(load_pipeline(folder), [shipped[i]["prompt"] for i in planted], SMOKE_CONFIG.groundtruth_seeds,
                      DDIM_SAMPLER.with_steps(SMOKE_CONFIG.groundtruth_steps)) * 2 - 1
    for i, generations in zip(planted, images):
        own = data.images[data.captions.index(shipped[i]["prompt"])]
        best = max(_own_ncc_float64(g, own) for g in generations)
        assert labelled[i]["best_ncc_own"] == pytest.approx(best, abs=2e-4)
        assert labelled[i]["label"] == int(best >= REPRODUCTION_THRESHOLD)
        assert labelled[i]["kind"] == ("planted" if labelled[i]["label"] else "planted_not_reproduced")
    assert all(labelled[i]["label"] == 0 and labelled[i]["kind"] == shipped[i]["kind"]
               for i in range(len(shipped)) if i not in planted)
    reproduced = np.mean([labelled[i]["label"] for i in planted])
    assert stats[0]["groundtruth"]["planted_reproduced"] == pytest.approx(reproduced)


def test_dose_data_plants_equal_groups_at_each_copy_count(tmp_path):
    from dataclasses import replace

    from transformers import CLIPTokenizer

    from scanner.clip_vocab import write_clip_tokenizer

    cfg = build_config("sd", smoke=True, dose=True)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tokenizer"))
    seed = _draw_seed()
    data = make_data(cfg, np.random.default_rng(seed), tokenizer)
    planted = [row for row in data.eval_prompts if row["kind"] == "planted"]
    per_group = cfg.num_planted // len(cfg.dose)
    assert [row["copies"] for row in planted] == [n for n in cfg.dose for _ in range(per_group)], seed
    # The training set holds each planted caption as often as its row says, each normal caption once.
    counts = dict(zip(data.captions, data.repeats.tolist()))
    assert all(counts[row["prompt"]] == row["copies"] for row in planted), seed
    assert data.repeats[: cfg.num_normal].tolist() == [1] * cfg.num_normal
    assert all("copies" not in row for row in data.eval_prompts if row["kind"] != "planted")
    plain = make_data(SMOKE_CONFIG, np.random.default_rng(seed), tokenizer)
    assert all("copies" not in row for row in plain.eval_prompts)
    with pytest.raises(MemscanError, match="equal dose groups"):
        make_data(replace(cfg, num_planted=7), np.random.default_rng(seed), tokenizer)


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
    seed = _draw_seed()
    captions = load_memorized_captions()
    planted, held_out = split_by_template(captions, np.random.default_rng(seed))
    assert sorted(planted + held_out) == sorted(captions), f"seed {seed}"
    shared = set().union(*map(content_bigrams, planted)) & set().union(*map(content_bigrams, held_out))
    assert not shared, f"seed {seed}: {sorted(shared)[:5]}"
    assert min(len(planted), len(held_out)) >= 150, f"seed {seed}: {len(planted)} planted, {len(held_out)} held out"


def test_planted_images_are_distinct():
    seed = _draw_seed()
    images = make_planted_images(30, np.random.default_rng(seed))
    ncc = normalized_cross_correlation(images, images, per_channel=False)
    assert np.abs(ncc[~np.eye(30, dtype=bool)]).max() < 0.3, f"seed {seed}"
    assert np.allclose(np.diag(ncc), 1), f"seed {seed}"


# A random sample of the bundled testbed's evaluation prompts is generated for (see the test).
SAMPLE_PLANTED, SAMPLE_NORMAL = 16, 4

bundled = pytest.mark.skipif(not (default_model_path() / "model_index.json").exists(), reason="no bundled testbed")


@bundled
def test_bundled_testbed_fits_and_has_labels():
    folder = default_model_path()
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 20 * 2**20
    rows = [json.loads(line) for line in default_labels_path().read_text().splitlines()]
    labels = [row["label"] for row in rows]
    assert labels.count(1) >= 100 and labels.count(0) >= 400


@bundled
def test_bundled_testbed_stats_record_a_groundtruth_of_these_prompts():
    """The recorded figures (the README quotes them) describe these labels, measured as the build measures."""
    folder = default_model_path()
    stats = json.loads((folder / "testbed_stats.json").read_text())
    gt = stats["groundtruth"]
    rows = [json.loads(line) for line in default_labels_path().read_text().splitlines()]
    counts = {kind: sum(row["kind"] == kind for row in rows) for kind in dict.fromkeys(row["kind"] for row in rows)}
    assert {kind: entry["n"] for kind, entry in gt["per_kind"].items()} == counts
    assert (gt["seeds"], gt["threshold"]) == (stats["config"]["groundtruth_seeds"], REPRODUCTION_THRESHOLD)
    assert gt["planted_reproduced"] == gt["per_kind"]["planted"]["frac_reproduced"] >= 0.9
    assert gt["normal_close_to_training"] <= 0.05


@pytest.mark.slow  # 400 generations of 50 steps; the bundle changes only when it is rebuilt
@bundled
def test_bundled_testbed_reproduces_planted_images():
    """Generate for a random sample of evaluation prompts, as the build measured all of them,
    and check the sample against the recorded rates."""
    folder = default_model_path()
    gt = json.loads((folder / "testbed_stats.json").read_text())["groundtruth"]
    data = load_build_data(folder)
    seed = _draw_seed()
    rng = np.random.default_rng(seed)
    planted = [i for i, row in enumerate(data.eval_prompts) if row["kind"] == "planted"]
    normal = [i for i, row in enumerate(data.eval_prompts) if row["label"] == 0]
    picked_planted = rng.choice(planted, SAMPLE_PLANTED, replace=False).tolist()
    picked_normal = rng.choice(normal, SAMPLE_NORMAL, replace=False).tolist()
    prompts = [data.eval_prompts[i]["prompt"] for i in picked_planted + picked_normal]

    # The build's measure: its seeds 0..seeds-1, DDIM 50 steps, guidance 7.5; NCC with the training images.
    images = generate(load_pipeline(folder), prompts, gt["seeds"]) * 2 - 1
    ncc = normalized_cross_correlation(images.reshape(-1, *images.shape[2:]), data.images)
    ncc = ncc.reshape(len(prompts), gt["seeds"], len(data.images))
    index = {caption: i for i, caption in enumerate(data.captions)}  # planted images come last, after the normal ones
    own = [index[p] for p in prompts[:SAMPLE_PLANTED]]
    reproduced = [bool(ncc[j, :, own[j]].max() >= gt["threshold"]) for j in range(SAMPLE_PLANTED)]
    close = ncc[SAMPLE_PLANTED:].max(axis=(1, 2)) >= gt["threshold"]
    message = f"seed {seed}: planted {picked_planted} reproduced {reproduced}; normal {picked_normal} close {close.tolist()}"

    # Each prompt's outcome is deterministic (the build's seeds and sampler), so the sample is
    # a draw without replacement from the build's outcomes: with 92 of 100 planted prompts
    # reproducing (8 not), the count of failures among 16 is hypergeometric(100, 8, 16), and
    # 6 or more failures has probability 1.6e-4. Were only half of them to reproduce (50 of
    # 100), the bound would catch it 91% of the time (hypergeometric(100, 50, 16) >= 6).
    failures_allowed = 5
    assert gt["per_kind"]["planted"]["n"] == 100 and gt["planted_reproduced"] >= 0.92  # what the bound is computed for
    assert reproduced.count(False) <= failures_allowed, message
    # No normal prompt of the build came as close as the threshold to any training image.
    assert gt["normal_close_to_training"] == 0.0 and not close.any(), message


def test_eval_command_writes_metrics_and_plot(smoke_builds, tmp_path):
    from scanner.cli import main
    from scanner.detect import DetectSettings, Scanner
    from scanner.evaluate import evaluate, read_labelled_prompts
    from scanner.model import load_model

    _, (folder, _) = smoke_builds
    seed = _draw_seed()
    out, plot = tmp_path / "eval.json", tmp_path / "roc.png"
    code = main(["eval", "--model", str(folder), "--labels", str(folder / "eval_prompts.jsonl"), "--json", str(out),
                 "--plot", str(plot), "--steps", "2", "--generations", "2", "--seed", str(seed), "--device", "cpu"])
    assert code == 0 and plot.stat().st_size > 0
    summary = json.loads(out.read_text())
    assert {"auc", "tpr_at_1pct_fpr", "acc", "n_pos", "n_neg", "settings", "per_kind"} <= set(summary)
    assert (summary["settings"]["end_step"], summary["settings"]["generations"], summary["settings"]["seed"]) == (2, 2, seed)
    # The same scoring through the library (the command's default batch of 16), then the metrics from sklearn.
    labels = [json.loads(line)["label"] for line in (folder / "eval_prompts.jsonl").read_text().splitlines()]
    scanner = Scanner(load_model(folder, device="cpu"), DetectSettings(end_step=2, generations=2, seed=seed))
    scores = evaluate(scanner, read_labelled_prompts(folder / "eval_prompts.jsonl"), batch_size=16).scores
    _assert_metrics_match_sklearn(summary, labels, scores, f"seed {seed}")


def test_testbed_build_command_runs_smoke(tmp_path, capsys):
    from scanner.cli import main

    assert main(["testbed", "build", "--out", str(tmp_path / "tb"), "--seed", "1", "--dose", "--smoke"]) == 0
    stats = json.loads((tmp_path / "tb" / "testbed_stats.json").read_text())
    assert stats["command"] == f"memscan testbed build --out {tmp_path / 'tb'} --seed 1 --dose --smoke"
    labelled = [json.loads(line) for line in (tmp_path / "tb" / GROUNDTRUTH_LABELS).read_text().splitlines()]
    planted = [row for row in labelled if "copies" in row]
    by_copies = stats["groundtruth"]["planted_reproduced_by_copies"]
    assert set(by_copies) == {str(n) for n in build_config("sd", smoke=True, dose=True).dose}
    for count, share in by_copies.items():
        assert share == pytest.approx(np.mean([row["label"] for row in planted if row["copies"] == int(count)]))
    out = capsys.readouterr().out
    assert "planted reproduced" in out and " at 1x" in out


@bundled
def test_demo_scans_the_bundled_testbed(tmp_path, capsys):
    from scanner.cli import main

    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"scores.jsonl", "summary.json", "roc.png"}
    labelled = [json.loads(line) for line in default_labels_path().read_text().splitlines()]
    scored = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert len(scored) == len(labelled)
    assert [{k: row[k] for k in EVAL_FIELDS} for row in scored] == [{k: row[k] for k in EVAL_FIELDS} for row in labelled]
    scores = np.array([row["score"] for row in scored])
    summary = json.loads((tmp_path / "summary.json").read_text())
    _assert_metrics_match_sklearn(summary, [row["label"] for row in labelled], scores)
    # The printed top 10: the ten highest scores of the file, highest first.
    out = capsys.readouterr().out.splitlines()
    top = out[out.index("top 10 prompts by memorization score (label 1 = planted, memorized):") + 1 :][:10]
    assert [float(line.split()[0]) for line in top] == pytest.approx(np.sort(scores)[::-1][:10], abs=5e-4)


def test_eval_mitigation_command_on_a_smoke_build(smoke_builds, tmp_path, capsys):
    from scanner.cli import main

    stats, (folder, _) = smoke_builds
    out = tmp_path / "mitigation.json"
    # A target above every score: the paper's method leaves every prompt untouched; the baselines never do.
    code = main(["eval-mitigation", "--model", str(folder), "--json", str(out), "--markdown", str(tmp_path / "t.md"),
                 "--target", "1e9", "--normal", "2", "--seeds", "0", "--methods", "embed,rand-number", "--device", "cpu",
                 "--inference-steps", str(SMOKE_CONFIG.groundtruth_steps)])  # the smoke build's ground truth's sampler
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
