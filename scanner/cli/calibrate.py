"""`memscan calibrate`: fit the flagging threshold for a target false-positive rate."""

from __future__ import annotations

import argparse

from .common import EXIT_OK, model_command, output_file, scanner_and_detector
from .progress import bar


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Score labelled prompts and write the threshold that meets the target false-positive rate."""
    import numpy as np

    from ..calibration import check_target_fpr, fit_calibration
    from ..evaluate import read_labelled_prompts, score_prompts
    from ..scan import scanner_settings, submit_batch

    check_target_fpr(args.target_fpr)  # option, label and output errors before the slow model load
    rows = read_labelled_prompts(args.labels)
    out = output_file(args.out)
    scanner, detector = scanner_and_detector(args, args.detector)
    with bar("scoring", total=len(rows)) as progress:
        scores = score_prompts(lambda batch: submit_batch(scanner, detector, batch).result().score, [row["prompt"] for row in rows],
                               args.batch_size, progress.update)
    calibration = fit_calibration(
        np.array([row["label"] for row in rows]),
        scores,
        args.target_fpr,
        model=scanner.model.fingerprint,
        settings=scanner_settings(scanner, detector),
        labels_file=args.labels,
    )
    calibration.save(out)
    print(
        f"threshold {calibration.threshold:.6g}: TPR {calibration.tpr:.3f}, FPR {calibration.fpr:.4f} "
        f"(target {calibration.target_fpr:g}) on {calibration.n_pos} memorized and {calibration.n_neg} normal prompts, "
        f"AUC {calibration.auc:.3f} -> {args.out}"
    )
    return EXIT_OK


def add_calibrate_command(commands: argparse._SubParsersAction) -> None:
    """Register `calibrate` on the `memscan` subparsers."""
    calibrate = model_command(
        commands,
        "calibrate",
        cmd_calibrate,
        detector=True,
        help="fit the flagging threshold for a target FPR on labelled prompts",
        description=(
            "Score labelled prompts (JSONL: prompt, label 1 memorized / 0 normal) and write the threshold with\n"
            "the highest true-positive rate whose false-positive rate is <= --target-fpr (flagged: score >=\n"
            "threshold), with the model fingerprint and detection settings (the detector's included) it is valid\n"
            "for. scan, sweep and serve take it with --calibration FILE and refuse it for another model or other\n"
            "settings, another detector among them."
        ),
    )
    calibrate.add_argument("--labels", required=True, metavar="FILE", help="labelled prompts, e.g. scanner/data/testbed/eval_prompts.jsonl")
    calibrate.add_argument("--target-fpr", type=float, default=0.01, help="largest false-positive rate allowed (default: 0.01)")
    calibrate.add_argument("--out", required=True, metavar="FILE", help="where to write the calibration (JSON)")
