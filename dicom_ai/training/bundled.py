"""The reproducible recipe of the bundled models (CI does not retrain them; a test runs ``--tiny``).

Run (steps may also run one at a time, ``--steps classifier``; ``work/summary.json`` accumulates)::

    .venv/bin/python -m dicom_ai.training.bundled --work /tmp/bundled-work \\
        --out dicom_ai/inference/bundled --weights-out dicom_ai/training/weights

Steps, every one seeded:

0. ``dicom-ai synth`` CR training studies (seed 1001) and held-out test studies (seed 2002, never
   seen in training), made once per work folder.
1. ``pretrain``: the ``synth-backbone`` learns without labels where the bright blobs of
   unlabelled synthetic radiographs of their own seed are (the ``blobs`` pretext of
   :mod:`~dicom_ai.training.pretrain`; ``--pretext inpainting`` for the other); its weights
   ship beside this package for users' fine-tuning.
2. ``classifier``: ``chest-nodule``, the ``synth-backbone`` CNN trained on the CR studies.
3. ``segmenter``: ``chest-nodule-seg``, a small U-Net on the same studies' masks.
4. ``curve``: test AUC vs number of labelled training studies, the same schedule from scratch
   and from the pretrained backbone (full fine-tuning; only the initial weights differ), with
   several seeds per size (each a different labelled subset) compared pair by pair. The
   schedule is a fixed number of optimisation steps whatever the size (``learning_curve_epochs``
   x ``learning_curve_steps_per_epoch`` batches of 32), and the last weights are kept: counting
   in epochs gave 12 studies a dozen gradient steps, and a validation set of three images cannot
   choose a "best" epoch.

5. ``protocol``: how to fine-tune the pretrained backbone on few labelled studies, decided on
   held-out TRAINING studies only (a validation split of the seed-1001 studies; the test
   studies are never looked at): small labelled subsets of the rest are trained from scratch
   and with each of :data:`PROTOCOLS` (full fine-tuning, a frozen-backbone stage then
   everything at a lower rate, the head alone), and scored by validation AUC.
6. ``ood``: the classifier's out-of-distribution statistics (``ood.npz``,
   :mod:`dicom_ai.inference.ood`) from its own training split of the seed-1001 studies (the
   ``classifier`` step writes them too; this step refits them for a bundled folder trained
   before they existed), validated against the test studies and pydicom's test images
   (:mod:`dicom_ai.training.ood_check`) into ``report/test/ood.json``.

Both models are evaluated on the test studies through the serving path; metrics, plots and
model cards go into each model folder's ``report/test`` and the summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dicom_ai.inference.spec import ModelSpec, read_spec, write_spec
from dicom_ai.training.augment import AugmentationSpec
from dicom_ai.training.evaluate import SYNTHETIC_NOTE, evaluate_model
from dicom_ai.training.pretrain import Pretext, pretrain_backbone, pretraining_report
from dicom_ai.training.synth import synthesize
from dicom_ai.training.train import TrainOptions, train

__all__ = ["PROTOCOLS", "STEPS", "Recipe", "backbone_weights_name", "build_bundled",
           "curve_summary", "main", "protocol_summary"]

CLASSIFIER = "chest-nodule"
SEGMENTER = "chest-nodule-seg"
VERSION = "1.0.0"
PROJECTION_MODALITIES = ["CR", "DX"]
#: Learning-curve sizes (labelled studies, half positive) and schedule: the same number of
#: optimisation steps at every size (epochs x steps per epoch, batches of 32).
LEARNING_CURVE_SIZES = (25, 50, 100, 200)
#: Each size is trained with each seed (a different labelled subset, initialisation and batch
#: order); scratch and pretrained runs of one seed share all three, so they pair.
LEARNING_CURVE_SEEDS = (5, 6, 7)
LEARNING_CURVE_EPOCHS = 6
LEARNING_CURVE_STEPS_PER_EPOCH = 50
#: Ways to train on a small labelled set, compared by the ``protocol`` step on validation
#: studies: name -> TrainOptions overrides (the schedule is the learning curve's). ``scratch``
#: has no backbone weights; the others start from the pretrained backbone.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "scratch": {"frozen_epochs": 0},
    "full": {"frozen_epochs": 0},
    "frozen-then-all": {"frozen_epochs": 2, "fine_tune_fraction": 1.0,
                        "fine_tune_learning_rate": 1e-4},
    "head-only": {"frozen_epochs": LEARNING_CURVE_EPOCHS},
}


def backbone_weights_name(input_size: int) -> str:
    """File name of the pretrained synth-backbone weights for square 1-channel inputs."""
    return f"synth-backbone-{input_size}x{input_size}x1.weights.h5"


@dataclass(frozen=True)
class Recipe:
    """Sizes of one build (the defaults are the shipped models; :meth:`tiny` is for tests)."""

    train_studies: int = 1000
    test_studies: int = 300
    pretrain_studies: int = 700
    pretrain_epochs: int = 12
    #: The self-supervised task (:func:`~dicom_ai.training.pretrain.pretrain_backbone`).
    pretext: Pretext = "blobs"
    classifier_epochs: int = 20
    segmenter_epochs: int = 8
    input_size: int = 128
    learning_curve: tuple[int, ...] = LEARNING_CURVE_SIZES
    learning_curve_seeds: tuple[int, ...] = LEARNING_CURVE_SEEDS
    learning_curve_epochs: int = LEARNING_CURVE_EPOCHS
    learning_curve_steps_per_epoch: int = LEARNING_CURVE_STEPS_PER_EPOCH
    #: The ``protocol`` step: labelled subset sizes and seeds, and how many of the training
    #: studies are set aside to validate on (the subsets are drawn from the others).
    protocol_sizes: tuple[int, ...] = (50,)
    protocol_seeds: tuple[int, ...] = (11, 12)
    protocol_validation_studies: int = 300

    @classmethod
    def tiny(cls) -> Recipe:
        """A build small enough for a test: minutes of CPU, not hours."""
        return cls(train_studies=24, test_studies=12, pretrain_studies=8, pretrain_epochs=1,
                   classifier_epochs=1, segmenter_epochs=1, input_size=64,
                   learning_curve=(12,), learning_curve_seeds=(5,), learning_curve_epochs=1,
                   learning_curve_steps_per_epoch=2, protocol_sizes=(8,), protocol_seeds=(5,),
                   protocol_validation_studies=10)


def _read_labels(labels: Path) -> tuple[list[str], list[dict[str, str]]]:
    import csv

    with open(labels, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _write_labels(fields: list[str], rows: list[dict[str, str]], out: Path,
                  source: Path) -> Path:
    """Write a labels CSV whose ``masks/`` (referenced relative to it) are ``source``'s."""
    import csv

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    masks = out.parent / "masks"
    if not masks.exists():
        masks.symlink_to((source.parent / "masks").resolve(), target_is_directory=True)
    return out


def _subset_labels(labels: Path, studies: int, out: Path, seed: int) -> Path:
    """A labels CSV of ``studies`` studies drawn from ``labels`` (half positive, seeded)."""
    import random

    fields, rows = _read_labels(labels)
    positives = [r for r in rows if r["label"] == "1"]
    negatives = [r for r in rows if r["label"] == "0"]
    half = studies // 2
    rng = random.Random(seed)  # noqa: S311 - a reproducible draw, not a secret
    chosen = rng.sample(positives, half) + rng.sample(negatives, studies - half)
    return _write_labels(fields, chosen, out, labels)


def _validation_split(labels: Path, validation: int, folder: Path) -> tuple[Path, Path]:
    """Split a labels CSV into ``pool.csv`` and ``validation.csv`` (``validation`` studies).

    Each synthetic study is its own patient, so a split by study is a split by patient.
    """
    import random

    fields, rows = _read_labels(labels)
    order = list(range(len(rows)))
    random.Random(4242).shuffle(order)  # noqa: S311 - a reproducible split, not a secret
    held = set(order[:validation])
    pool = [r for i, r in enumerate(rows) if i not in held]
    val = [r for i, r in enumerate(rows) if i in held]
    return (_write_labels(fields, pool, folder / "pool.csv", labels),
            _write_labels(fields, val, folder / "validation.csv", labels))


def _finish(folder: Path, target: Path, evaluation: dict[str, Any], test_data: str) -> ModelSpec:
    """Copy a trained folder into the bundle (no caches or checkpoints), metrics into its spec."""
    spec = read_spec(folder)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    keep = {k: float(v) for k, v in evaluation.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}
    spec = spec.model_copy(update={
        # DX phantoms are the same images as CR ones (only the SOP class differs).
        "modalities": PROJECTION_MODALITIES,
        "provenance": spec.provenance.model_copy(update={
            "metrics": keep,
            "notes": f"{SYNTHETIC_NOTE} Metrics on {test_data}.",
        }),
    })
    write_spec(spec, target)
    return spec


STEPS = ("pretrain", "classifier", "segmenter", "curve", "protocol", "ood")


def build_bundled(work: Path, out: Path, weights_out: Path, recipe: Recipe,
                  *, steps: tuple[str, ...] = STEPS,
                  curve_results: Path | None = None,
                  protocol_results: Path | None = None,
                  scratch_from: Path | None = None) -> dict[str, Any]:
    """Run the recipe's steps (see the module docstring); returns the summary it also writes.

    Each step can run on its own (the summary in ``work/summary.json`` accumulates), so a long
    build can be resumed step by step.

    Parameters
    ----------
    work : Path
        Scratch folder (synthetic data, training runs, ``summary.json``).
    out : Path
        Where ``chest-nodule/1.0.0`` and ``chest-nodule-seg/1.0.0`` are written.
    weights_out : Path
        Folder for the pretrained backbone weights.
    recipe : Recipe
        Sizes.
    steps : tuple of str
        Any of ``pretrain``, ``classifier``, ``segmenter``, ``curve`` (learning curve: test AUC
        vs labelled training studies, from scratch vs from the pretrained backbone),
        ``protocol`` (fine-tuning protocols compared on validation studies).
    curve_results : Path, optional
        A learning-curve results file (``benchmarks/results/learning_curve.json``): pairs it
        already holds for the same backbone weights (by SHA-256) are not trained again, and the
        file is rewritten with every pair of that backbone, so a grid can be completed over
        several runs or machines.
    protocol_results : Path, optional
        Where the ``protocol`` step writes its runs and summary
        (``benchmarks/results/transfer_protocol.json``).
    scratch_from : Path, optional
        A learning-curve results file of another backbone whose scratch arms are reused for
        the same sizes and seeds (the scratch arm never sees the backbone), so a new backbone's
        curve trains only its own arm.

    Returns
    -------
    dict
        Timings, backbone result, test metrics of both models, learning curve points.
    """
    from dicom_ai.training import report

    unknown = set(steps) - set(STEPS)
    if unknown:
        raise ValueError(f"unknown step(s) {sorted(unknown)}; steps are {', '.join(STEPS)}")
    started = time.perf_counter()
    summary_path = work / "summary.json"
    summary: dict[str, Any] = (json.loads(summary_path.read_text())
                               if summary_path.is_file() else {})
    summary["recipe"] = recipe.__dict__ | {"learning_curve": list(recipe.learning_curve)}
    train_dir, test_dir = work / "cr-train", work / "cr-test"
    for folder, studies, seed in ((train_dir, recipe.train_studies, 1001),
                                  (test_dir, recipe.test_studies, 2002)):
        if not (folder / "labels.csv").is_file():
            synthesize(folder, studies=studies, seed=seed, modality="CR")
    test_data = f"{recipe.test_studies} held-out dicom-ai synth CR studies (seed 2002)"
    weights = weights_out / backbone_weights_name(recipe.input_size)
    if "pretrain" in steps:
        summary["backbone"] = pretrain_backbone(
            weights, workdir=work / "pretrain", studies=recipe.pretrain_studies,
            epochs=recipe.pretrain_epochs, input_size=recipe.input_size, seed=3,
            pretext=recipe.pretext)

    training_data = (f"{recipe.train_studies} dicom-ai synth CR studies (seed 1001), split by "
                     "patient 80/20")
    runs = work / "runs"
    chosen: list[TrainOptions] = []
    if "classifier" in steps:
        chosen.append(TrainOptions(
            data=train_dir, labels=train_dir / "labels.csv", arch="synth-backbone",
            out=runs / CLASSIFIER, name=CLASSIFIER, version=VERSION,
            epochs=recipe.classifier_epochs, seed=7, input_size=recipe.input_size,
            training_data=training_data, augment=AugmentationSpec(),
            description="Chest radiograph (CR/DX) nodule present/absent (synth-backbone CNN)"))
    if "segmenter" in steps:
        chosen.append(TrainOptions(
            data=train_dir, labels=train_dir / "labels.csv", arch="unet", out=runs / SEGMENTER,
            name=SEGMENTER, version=VERSION, epochs=recipe.segmenter_epochs, seed=11,
            input_size=recipe.input_size, training_data=training_data,
            augment=AugmentationSpec(),
            description="Chest radiograph (CR/DX) nodule segmentation (small U-Net); detections "
                        "are connected components"))
    models = summary.setdefault("models", {})
    for options in chosen:
        if options.out.exists():
            shutil.rmtree(options.out)
        result = train(options)
        evaluation = evaluate_model(options.out, test_dir, test_dir / "labels.csv",
                                    out=options.out / "report" / "test")
        spec = _finish(options.out, out / str(options.name) / VERSION, evaluation, test_data)
        models[spec.name] = {"train_seconds": round(result.seconds, 1), "test": evaluation}

    if "curve" in steps:
        curve_started = time.perf_counter()
        backbone_sha = hashlib.sha256(weights.read_bytes()).hexdigest()
        known = _known_pairs(curve_results, backbone_sha)
        reusable = _known_pairs(scratch_from, None)
        runs_done: list[dict[str, Any]] = []
        for studies in recipe.learning_curve:
            for seed in recipe.learning_curve_seeds:
                done = known.get((studies, seed)) or _curve_run(
                    work / f"curve-{studies}-seed{seed}-{backbone_sha[:12]}", train_dir,
                    test_dir, weights, recipe, studies, seed,
                    scratch=reusable.get((studies, seed)))
                runs_done.append(done)
                known[(studies, seed)] = done
                if curve_results is not None:
                    _write_curve_results(curve_results, recipe, weights, backbone_sha,
                                         list(known.values()))
                print(f"learning curve: {studies} studies, seed {seed}: scratch AUC "
                      f"{done['scratch_auc']:.3f}, pretrained AUC {done['pretrained_auc']:.3f}",
                      flush=True)
        summary["learning_curve_runs"] = runs_done
        summary["learning_curve"] = curve_summary(runs_done)
        summary["learning_curve_schedule"] = {
            "steps": recipe.learning_curve_epochs * recipe.learning_curve_steps_per_epoch,
            "batch_size": 32, "learning_rate": 1e-3, "kept": "last epoch",
            "seeds": list(recipe.learning_curve_seeds),
            "seconds": round(time.perf_counter() - curve_started, 1)}
        curve_png = out / CLASSIFIER / VERSION / "report" / "learning_curve.png"
        # Every pair known: with a results file, also those it held before this run's grid.
        report.plot_learning_curve(
            [(r["studies"], r["scratch_auc_mean"], r["pretrained_auc_mean"])
             for r in curve_summary(list(known.values()))["sizes"]], curve_png)
    if "protocol" in steps:
        selection = work / "protocol"
        pool, validation = _validation_split(train_dir / "labels.csv",
                                             recipe.protocol_validation_studies, selection)
        rows = []
        for studies in recipe.protocol_sizes:
            for seed in recipe.protocol_seeds:
                found = _protocol_run(selection / f"{studies}-seed{seed}", train_dir, pool,
                                      validation, weights, recipe, studies, seed)
                rows.extend(found)
                print("protocol: " + ", ".join(
                    f"{r['protocol']} {r['validation_auc']:.3f}" for r in found)
                    + f" ({studies} studies, seed {seed}, validation AUC)", flush=True)
        summary["protocol_runs"] = rows
        summary["protocol"] = protocol_summary(rows) | {
            "validation": (f"{recipe.protocol_validation_studies} of the "
                           f"{recipe.train_studies} training studies (seed 1001), never in a "
                           "subset; the test studies are not used"),
            "schedule": "as the learning curve"}
        if protocol_results is not None:
            protocol_results.parent.mkdir(parents=True, exist_ok=True)
            protocol_results.write_text(json.dumps(
                {"benchmark": "transfer_protocol", "protocols": PROTOCOLS,
                 "backbone_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                 "runs": rows, "summary": summary["protocol"]}, indent=2, default=float) + "\n")
    if "ood" in steps:
        from dicom_ai.training.ood_check import bundle_ood, validate_ood

        folder = out / CLASSIFIER / VERSION
        stats = bundle_ood(folder, train_dir)
        if stats is not None:
            ood_result = validate_ood(folder, test_dir)
            (folder / "report" / "test").mkdir(parents=True, exist_ok=True)
            (folder / "report" / "test" / "ood.json").write_text(
                json.dumps(ood_result, indent=2, default=float) + "\n")
            summary["ood"] = ood_result
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary_path.write_text(json.dumps(summary, indent=2, default=float))
    return summary


def _train_on_schedule(run: Path, name: str, train_dir: Path, labels: Path, recipe: Recipe,
                       seed: int, backbone: Path | None, **overrides: Any) -> None:
    """Train ``synth-backbone`` into a fresh ``run`` on the learning curve's schedule.

    A fixed number of steps whatever the size (``learning_curve_epochs`` x
    ``learning_curve_steps_per_epoch`` batches), and the last weights; ``overrides`` are more
    :class:`TrainOptions` (the fine-tuning protocol).
    """
    if run.exists():
        shutil.rmtree(run)
    train(TrainOptions(
        data=train_dir, labels=labels, arch="synth-backbone", out=run, name=name,
        version="0.0.1", epochs=recipe.learning_curve_epochs,
        steps_per_epoch=recipe.learning_curve_steps_per_epoch, keep_best=False,
        backbone_weights=backbone, seed=seed, input_size=recipe.input_size, val_fraction=0.25,
        **overrides), say=lambda _: None)


def _curve_run(folder: Path, train_dir: Path, test_dir: Path, weights: Path, recipe: Recipe,
               studies: int, seed: int, scratch: dict[str, Any] | None = None) -> dict[str, Any]:
    """One learning-curve pair: the same subset, seed and schedule from scratch and pretrained.

    The pair's result is kept in ``folder/result.json``, so an interrupted curve resumes.
    ``scratch`` (``scratch_auc``, ``scratch_auc_ci95``) reuses the scratch arm of the same
    subset, seed and schedule measured with another backbone: it does not depend on one.
    """
    done = folder / "result.json"
    if done.is_file():
        return dict(json.loads(done.read_text()))
    labels = _subset_labels(train_dir / "labels.csv", studies, folder / "labels.csv",
                            seed=seed * 1000 + studies)
    row: dict[str, Any] = {"studies": studies, "seed": seed}
    if scratch is not None:
        row |= {"scratch_auc": scratch["scratch_auc"],
                "scratch_auc_ci95": scratch["scratch_auc_ci95"], "scratch_reused": True}
    for backbone in (None, weights) if scratch is None else (weights,):
        name = "pretrained" if backbone else "scratch"
        run = folder / name
        # Only the initial weights differ (full fine-tuning at the same learning rate).
        _train_on_schedule(run, f"curve-{name}", train_dir, labels, recipe, seed, backbone,
                           frozen_epochs=0)
        metrics = evaluate_model(run, test_dir, test_dir / "labels.csv", n_bootstrap=1000)
        row[f"{name}_auc"] = float(metrics["roc_auc"] or 0.0)
        row[f"{name}_auc_ci95"] = metrics["roc_auc_ci95"]
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    done.write_text(json.dumps(row, default=float))
    return row


def _protocol_run(folder: Path, train_dir: Path, pool: Path, validation: Path, weights: Path,
                  recipe: Recipe, studies: int, seed: int) -> list[dict[str, Any]]:
    """Every :data:`PROTOCOLS` entry on one labelled subset of ``pool``, scored on ``validation``.

    Each result is kept in ``folder/<protocol>.json``, so an interrupted step resumes.
    """
    labels = _subset_labels(pool, studies, folder / "labels.csv", seed=seed * 1000 + studies)
    rows = []
    for protocol, overrides in PROTOCOLS.items():
        done = folder / f"{protocol}.json"
        if not done.is_file():
            run = folder / protocol
            _train_on_schedule(run, f"protocol-{protocol}", train_dir, labels, recipe, seed,
                               None if protocol == "scratch" else weights, **overrides)
            metrics = evaluate_model(run, train_dir, validation, n_bootstrap=200)
            shutil.rmtree(run)
            done.write_text(json.dumps({
                "studies": studies, "seed": seed, "protocol": protocol,
                "validation_auc": float(metrics["roc_auc"] or 0.0)}))
        rows.append(dict(json.loads(done.read_text())))
    return rows


def protocol_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean validation AUC per protocol and size, and the pretrained protocol that did best.

    Parameters
    ----------
    rows : list of dict
        ``studies``, ``seed``, ``protocol``, ``validation_auc`` per run.

    Returns
    -------
    dict
        ``protocols``: per protocol, the mean AUC over all its runs and per size;
        ``best_pretrained``: the protocol other than ``scratch`` with the highest mean.
    """
    import numpy as np

    table: dict[str, Any] = {}
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        mine = [r for r in rows if r["protocol"] == protocol]
        table[protocol] = {
            "mean_auc": float(np.mean([r["validation_auc"] for r in mine])),
            "sizes": {str(n): float(np.mean([r["validation_auc"] for r in mine
                                             if r["studies"] == n]))
                      for n in sorted({r["studies"] for r in mine})}}
    pretrained = {k: v["mean_auc"] for k, v in table.items() if k != "scratch"}
    return {"protocols": table,
            "best_pretrained": max(pretrained, key=lambda k: pretrained[k]) if pretrained
            else None}


def _known_pairs(results: Path | None,
                 backbone_sha: str | None) -> dict[tuple[int, int], dict[str, Any]]:
    """Pairs a results file already holds for these backbone weights (none for other weights).

    ``backbone_sha`` None: the pairs whatever the weights (to reuse their scratch arms).
    """
    if results is None or not results.is_file():
        return {}
    saved = json.loads(results.read_text())
    if backbone_sha is not None and saved.get("backbone", {}).get("sha256") != backbone_sha:
        return {}
    return {(int(r["studies"]), int(r["seed"])): dict(r) for r in saved.get("runs", [])}


def _write_curve_results(results: Path, recipe: Recipe, weights: Path, backbone_sha: str,
                         runs: list[dict[str, Any]]) -> None:
    """(Re)write the learning-curve results file: recipe, backbone, every pair, the summary."""
    runs = sorted(runs, key=lambda r: (r["studies"], r["seed"]))
    pretraining = pretraining_report(weights)
    steps = recipe.learning_curve_epochs * recipe.learning_curve_steps_per_epoch
    document = {
        "benchmark": "learning_curve",
        "recipe": (f"dicom_ai.training.bundled curve step: {steps} steps "
                   f"({recipe.learning_curve_epochs} epochs x "
                   f"{recipe.learning_curve_steps_per_epoch} batches of 32), Adam 1e-3, default "
                   "augmentation, last weights; balanced subsets drawn with seed*1000+studies; "
                   f"test: {recipe.test_studies} held-out synth CR studies (seed 2002)"),
        "backbone": {
            "file": weights.name, "sha256": backbone_sha,
            "pretraining": (json.loads(pretraining.read_text()) if pretraining.is_file()
                            else None),
        },
        "runs": runs,
        "summary": curve_summary(runs),
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(document, indent=2, default=float) + "\n")


def curve_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Summarise paired learning-curve runs (scratch vs pretrained on the same subset and seed).

    Parameters
    ----------
    runs : list of dict
        ``studies``, ``seed``, ``scratch_auc``, ``pretrained_auc`` per run.

    Returns
    -------
    dict
        ``sizes``: per size, the mean and standard deviation of each arm's AUC over the seeds,
        the mean paired difference (pretrained - scratch) and how many seeds pretrained won;
        ``all``: the same difference over every pair with a one-sided Wilcoxon signed-rank
        p-value (pretrained better), and ``small`` the same for sizes up to 100 studies.
    """
    import numpy as np
    from scipy.stats import wilcoxon

    def paired(rows: list[dict[str, Any]]) -> dict[str, Any]:
        diff = np.array([r["pretrained_auc"] - r["scratch_auc"] for r in rows])
        result: dict[str, Any] = {"pairs": len(rows), "mean_difference": float(diff.mean()),
                                  "pretrained_wins": int((diff > 0).sum())}
        if len(rows) >= 2 and np.any(diff != 0):
            result["wilcoxon_p_one_sided"] = float(
                wilcoxon(diff, alternative="greater").pvalue)
        return result

    sizes = []
    for studies in sorted({r["studies"] for r in runs}):
        rows = [r for r in runs if r["studies"] == studies]
        scratch = np.array([r["scratch_auc"] for r in rows])
        pretrained = np.array([r["pretrained_auc"] for r in rows])
        sizes.append({"studies": studies, "seeds": len(rows),
                      "scratch_auc_mean": float(scratch.mean()),
                      "scratch_auc_sd": float(scratch.std(ddof=1)) if len(rows) > 1 else 0.0,
                      "pretrained_auc_mean": float(pretrained.mean()),
                      "pretrained_auc_sd": (float(pretrained.std(ddof=1)) if len(rows) > 1
                                            else 0.0),
                      **paired(rows)})
    return {"sizes": sizes, "all": paired(runs),
            "small": paired([r for r in runs if r["studies"] <= 100])}


# The options that replace one of the recipe's tuples of whole numbers: option -> (Recipe
# field, what it holds).
_NUMBER_OPTIONS = {
    "--curve-sizes": ("learning_curve", "learning-curve sizes"),
    "--curve-seeds": ("learning_curve_seeds", "learning-curve seeds"),
    "--protocol-sizes": ("protocol_sizes", "protocol step sizes"),
    "--protocol-seeds": ("protocol_seeds", "protocol step seeds"),
}


def _add_numbers_option(parser: argparse.ArgumentParser, option: str) -> None:
    """Add one of :data:`_NUMBER_OPTIONS`, comma-separated, its help showing the default."""
    field_name, what = _NUMBER_OPTIONS[option]
    default = ",".join(map(str, getattr(Recipe, field_name)))
    parser.add_argument(option, help=f"{what}, comma-separated (default {default})")


def main() -> None:
    """Command-line entry: build the bundled models."""
    parser = argparse.ArgumentParser(description="Train the bundled dicom-ai models.")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder")
    parser.add_argument("--out", type=Path, required=True, help="bundled models folder")
    parser.add_argument("--weights-out", type=Path, required=True, help="backbone weights folder")
    parser.add_argument("--tiny", action="store_true", help="a minutes-long smoke build")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--summary", type=Path, help="also copy the summary JSON here")
    _add_numbers_option(parser, "--curve-sizes")
    _add_numbers_option(parser, "--curve-seeds")
    parser.add_argument("--curve-results", type=Path,
                        help="learning-curve results file to resume from and rewrite, e.g. "
                             "benchmarks/results/learning_curve.json")
    parser.add_argument("--pretext", choices=["inpainting", "blobs"],
                        help="the pretrain step's self-supervised task (default: the recipe's)")
    parser.add_argument("--curve-scratch-from", type=Path,
                        help="reuse the scratch arms of this learning-curve results file")
    _add_numbers_option(parser, "--protocol-sizes")
    _add_numbers_option(parser, "--protocol-seeds")
    parser.add_argument("--protocol-results", type=Path,
                        help="where the protocol step writes its results, e.g. "
                             "benchmarks/results/transfer_protocol.json")
    args = parser.parse_args()
    recipe = Recipe.tiny() if args.tiny else Recipe()
    numbers: dict[str, Any] = {}
    for option, (field_name, _) in _NUMBER_OPTIONS.items():
        text = getattr(args, option[2:].replace("-", "_"))  # argparse's dest of the option
        if text:
            numbers[field_name] = tuple(int(n) for n in text.split(","))
    recipe = replace(recipe, **numbers)
    if args.pretext:
        recipe = replace(recipe, pretext=args.pretext)
    summary = build_bundled(args.work, args.out, args.weights_out, recipe,
                            steps=tuple(step for step in args.steps.split(",") if step),
                            curve_results=args.curve_results,
                            protocol_results=args.protocol_results,
                            scratch_from=args.curve_scratch_from)
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print(json.dumps({name: {k: v for k, v in model["test"].items()
                             if k in {"roc_auc", "roc_auc_ci95", "dice_mean", "sensitivity",
                                      "specificity", "fp_per_image"}}
                      for name, model in summary.get("models", {}).items()}, indent=2,
                     default=float))


if __name__ == "__main__":
    main()
