"""Models and data: ``train``, ``evaluate``, ``synth``, ``preview``, ``demo``."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dicom_ai.cli._common import (
    ConfigOption,
    _emit,
    command_context,
    console,
)
from dicom_ai.cli.models import _model_folder


def preview(
    target: Annotated[Path, typer.Argument(help="A DICOM file or a series folder.",
                                           exists=True)],
    model: Annotated[str, typer.Option("--model", help="A registered model name (NAME or "
                                       "NAME@VERSION), a model folder, or a preprocessing spec "
                                       "file (TOML or JSON).")],
    out: Annotated[Path, typer.Option("--out", help="PNG to write.")],
    config: ConfigOption = None,
) -> None:
    """Write the exact preprocessed input a model would get (a montage for volumes)."""
    from dicom_ai.inference.spec import read_spec
    from dicom_ai.pipeline.preview import load_spec
    from dicom_ai.pipeline.preview import preview as make_preview

    with command_context(config) as ctx:
        candidate = Path(model)
        if candidate.is_dir():
            spec = read_spec(candidate).preprocessing
        elif candidate.is_file():
            spec = load_spec(candidate)
        else:
            spec = _model_folder(model, ctx)[1].preprocessing
        steps = make_preview(target, spec, out, limits=ctx.settings.limits)
    for step in steps:
        typer.echo(step)
    typer.echo(f"wrote {out}")


class SynthModality(StrEnum):
    """Modalities `synth` can make."""

    CR = "CR"
    DX = "DX"
    CT = "CT"
    MR = "MR"


class SynthPhantom(StrEnum):
    """CT phantoms `synth` can make."""

    ABDOMEN = "abdomen"
    CHEST = "chest"


def synth(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    studies: Annotated[int, typer.Option(min=1, help="Number of studies.")] = 10,
    seed: Annotated[int, typer.Option(help="Same seed, same studies (byte-identical).")] = 0,
    modality: Annotated[SynthModality, typer.Option(help="CR, DX, CT or MR.")] = SynthModality.CR,
    positive_fraction: Annotated[float, typer.Option(
        "--positive-fraction", min=0.0, max=1.0, help="Share of studies with lesions.")] = 0.5,
    difficulty: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Higher: smaller, fainter lesions.")] = 0.5,
    compress: Annotated[bool, typer.Option(help="Compress some studies (RLE, JPEG 2000, "
                                           "JPEG-LS).")] = True,
    phantom: Annotated[SynthPhantom, typer.Option(
        help="CT only: abdomen (small, 16-24 slices) or chest (realistic: 100-300 slices of "
             "512x512, lesions 3-30 mm, masks and lesions.csv).")] = SynthPhantom.ABDOMEN,
    matrix: Annotated[int, typer.Option(
        min=32, max=1024, help="Chest CT: rows and columns per slice (same field of view).")
    ] = 512,
) -> None:
    """Write synthetic phantom studies with ground truth (labels.csv and lesion masks)."""
    from dicom_ai.training.synth import ChestCT, synthesize

    if phantom is SynthPhantom.CHEST and modality is not SynthModality.CT:
        raise typer.BadParameter("--phantom chest needs --modality CT", param_hint="--phantom")
    chest_ct = ChestCT.for_matrix(matrix) if phantom is SynthPhantom.CHEST else None
    report = synthesize(out, studies=studies, seed=seed, modality=modality.value,
                        positive_fraction=positive_fraction, difficulty=difficulty,
                        compress=compress, chest_ct=chest_ct)
    typer.echo(f"wrote {report.studies} {modality.value} studies ({report.instances} instances, "
               f"{report.positives} positive, {report.lesions} lesions) to {report.out}")
    typer.echo(f"labels: {report.labels_csv}")
    if report.lesions_csv is not None:
        typer.echo(f"lesions: {report.lesions_csv}")
    for line in report.fallbacks:
        typer.echo(f"note: {line}")


def train(
    data: Annotated[Path, typer.Option("--data", help="Folder of DICOM files.", exists=True,
                                       file_okay=False)],
    labels: Annotated[Path, typer.Option("--labels", help="Labels CSV (SOPInstanceUID, label, "
                                         "optional mask_path).", exists=True, dir_okay=False)],
    arch: Annotated[str, typer.Option("--arch", help="seed-cnn, synth-backbone, mobilenetv2, "
                                      "efficientnetb0, densenet121 or unet.")],
    out: Annotated[Path, typer.Option("--out", help="Model folder to write.")],
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 10,
    augment: Annotated[str, typer.Option(help="'default', 'none' or key=value,... (rotation, "
                                         "width_shift, height_shift, shear, zoom, "
                                         "horizontal_flip, fill_mode).")] = "default",
    weights: Annotated[Path | None, typer.Option(
        "--weights", help="Backbone weights file (e.g. ImageNet weights you have, or the "
        "bundled synth-backbone weights).", exists=True, dir_okay=False)] = None,
    seed: Annotated[int, typer.Option(help="Random seed (split, initialisation, "
                                      "augmentation).")] = 0,
    name: Annotated[str | None, typer.Option(help="Model name (default: the --out folder's "
                                             "name).")] = None,
    model_version: Annotated[str | None, typer.Option("--version", help="Model version "
                                                      "(default: date-based).")] = None,
    input_size: Annotated[int, typer.Option("--input-size", min=16, help="Square input "
                                            "side.")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    learning_rate: Annotated[float, typer.Option("--learning-rate", min=0.0)] = 1e-3,
    val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.05, max=0.5)] = 0.2,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints.")] = False,
) -> None:
    """Train a model on labelled DICOM and write a registered-ready model folder."""
    from dicom_ai.training.augment import parse_augment
    from dicom_ai.training.train import TrainOptions
    from dicom_ai.training.train import train as run_training

    with command_context(fails=(ValueError,)):  # ValueError: a bad --augment
        augmentation = parse_augment(augment)
    options = TrainOptions(
        data=data, labels=labels, arch=arch, out=out, name=name, version=model_version,
        epochs=epochs, batch_size=batch_size, augment=augmentation, backbone_weights=weights,
        seed=seed, val_fraction=val_fraction, input_size=input_size,
        learning_rate=learning_rate, resume=resume)
    with command_context():  # train takes no --config: its context only maps errors
        result = run_training(options, say=typer.echo)
    typer.echo(f"done in {result.seconds:.0f} s; register it with: dicom-ai models add {out}")


def evaluate(
    model: Annotated[str, typer.Option("--model", help="A registered model (NAME or "
                                       "NAME@VERSION) or a model folder.")],
    data: Annotated[Path, typer.Option("--data", help="Folder of DICOM files.", exists=True,
                                       file_okay=False)],
    labels: Annotated[Path, typer.Option("--labels", help="Labels CSV.", exists=True,
                                         dir_okay=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Report folder: plots, "
                                             "metrics.json, model_card.md.")] = None,
    target_sensitivity: Annotated[float, typer.Option(
        "--target-sensitivity", min=0.0, max=1.0)] = 0.9,
    bootstrap: Annotated[int, typer.Option(min=100, help="Bootstrap resamples for the "
                                           "AUC CI.")] = 1000,
    config: ConfigOption = None,
) -> None:
    """Evaluate a model on labelled DICOM through the serving path."""
    from dicom_ai.training.evaluate import evaluate_model

    with command_context(config) as ctx:
        folder, _ = _model_folder(model, ctx)
        result = evaluate_model(folder, data, labels, out=out,
                                target_sensitivity=target_sensitivity, n_bootstrap=bootstrap,
                                say=None if as_json else typer.echo)
    if as_json:
        typer.echo(json.dumps(result, default=float))
        return
    for key, value in result.items():
        if isinstance(value, float):
            typer.echo(f"{key:34s} {value:.4f}")
        else:
            typer.echo(f"{key:34s} {value}")
    if out is not None:
        typer.echo(f"report: {out}")


class DemoModality(StrEnum):
    """What `demo` pushes."""

    CR = "CR"
    CT = "CT"


def demo(
    studies: Annotated[int | None, typer.Option(min=1, max=50, help="Synthetic studies to push "
                                                "(default: 4 CR, 2 CT).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic studies.")] = 7,
    work: Annotated[Path | None, typer.Option(help="Keep everything in this folder (default: "
                                              "a new folder under /tmp).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the results.")] = 300.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as a JSON "
                                          "object.")] = False,
    modality: Annotated[DemoModality, typer.Option(
        "--modality", help="CR: chest radiographs and the chest-nodule model; CT: chest CT "
        "volumes and the chest-ct-nodule volume model (SEG and 3D SR back).")] = DemoModality.CR,
    matrix: Annotated[int, typer.Option(min=64, max=512, help="CT only: rows and columns of "
                                        "each slice.")] = 256,
) -> None:
    """Push synthetic studies through the whole loop and show the results a PACS received."""
    import tempfile

    from dicom_ai.config import LoggingSettings
    from dicom_ai.demo import run_demo
    from dicom_ai.logs import setup_logging as _setup

    _setup(LoggingSettings(level="WARNING"))
    folder = work or Path(tempfile.mkdtemp(prefix="dicom-ai-demo-"))
    if modality == DemoModality.CT:
        _demo_ct(folder, studies=studies or 2, seed=seed, timeout=timeout, as_json=as_json,
                 matrix=matrix)
        return
    studies = studies or 4
    console.print(f"demo: {studies} synthetic chest radiographs, stand-in PACS and service on "
                  f"loopback, work folder {folder}")
    result = run_demo(folder, studies=studies, seed=seed, timeout=timeout)
    if as_json:
        typer.echo(json.dumps({
            "complete": result.complete, "seconds": result.seconds,
            "work": str(result.work), "pacs_folder": str(result.pacs_folder),
            "studies": [{"StudyInstanceUID": s.study_instance_uid, "truth": s.truth,
                         "probability": s.probability, "present": s.present,
                         "agrees": s.agrees, "sr_path": str(s.sr_path) if s.sr_path else None,
                         "heatmap_paths": [str(p) for p in s.heatmap_paths]}
                        for s in result.studies]}, indent=2))
        if not result.complete:
            raise typer.Exit(1)
        return
    table = Table("study", "truth", "probability", "decision", "agrees", "SR received",
                  "heat-map SC")
    for s in result.studies:
        table.add_row(
            s.study_instance_uid, "nodule" if s.truth else "none",
            "" if s.probability is None else f"{s.probability:.3f}",
            "" if s.present is None else ("present" if s.present else "absent"),
            "" if s.agrees is None else ("yes" if s.agrees else "[red]no[/red]"),
            str(s.sr_path) if s.sr_path else "[red]missing[/red]",
            " ".join(str(p) for p in s.heatmap_paths))
    _emit(table)
    typer.echo(f"{sum(1 for s in result.studies if s.sr_path)} of {len(result.studies)} SRs "
               f"received by the stand-in PACS in {result.seconds:.1f} s "
               f"(results in {result.pacs_folder})")
    if not result.complete:
        raise typer.Exit(1)



def _demo_ct(folder: Path, *, studies: int, seed: int, timeout: float, as_json: bool,
             matrix: int) -> None:
    """``demo --modality CT``: the volume loop, lesions found against the synthetic truth."""
    from dicom_ai.demo import CT_MODEL, MATCH_MARGIN_MM, run_ct_demo

    console.print(f"demo: {studies} synthetic chest CT volumes ({matrix}x{matrix} slices), "
                  f"stand-in PACS and service on loopback, model {CT_MODEL}, work folder "
                  f"{folder}")
    result = run_ct_demo(folder, studies=studies, seed=seed, timeout=timeout, matrix=matrix)

    def mm3(values: list[float | None]) -> str:
        return ", ".join("?" if v is None else f"{v:.0f}" for v in values) or "-"

    if as_json:
        typer.echo(json.dumps({
            "complete": result.complete, "seconds": result.seconds,
            "work": str(result.work), "pacs_folder": str(result.pacs_folder),
            "studies": [{
                "StudyInstanceUID": s.study_instance_uid,
                "truth": [{"volume_mm3": t.volume_mm3, "diameter_mm": t.diameter_mm,
                           "centroid": list(t.centroid)} for t in s.truth],
                "found": [{"volume_mm3": f.volume_mm3, "probability": f.probability,
                           "longest_axial_diameter_mm": f.longest_axial_diameter_mm,
                           "centroid": None if f.centroid is None else list(f.centroid),
                           "segment_number": f.segment_number} for f in s.found],
                "matches": s.matches, "hits": s.hits, "false_positives": s.false_positives,
                "sr_path": str(s.sr_path) if s.sr_path else None,
                "seg_path": str(s.seg_path) if s.seg_path else None}
                for s in result.studies]}, indent=2))
        if not result.complete:
            raise typer.Exit(1)
        return
    table = Table("study", "true lesions (mm3)", "found (mm3)", "hits", "false +",
                  "SR received", "SEG received")
    for s in result.studies:
        table.add_row(
            s.study_instance_uid, mm3([t.volume_mm3 for t in s.truth]),
            mm3([f.volume_mm3 for f in s.found]) if s.sr_path else "",
            "" if s.hits is None else f"{s.hits} of {len(s.truth)}",
            "" if s.false_positives is None else str(s.false_positives),
            str(s.sr_path) if s.sr_path else "[red]missing[/red]",
            str(s.seg_path) if s.seg_path else ("-" if s.sr_path and not s.found
                                                else "[red]missing[/red]"))
    _emit(table)
    truth = sum(len(s.truth) for s in result.studies)
    hits = sum(s.hits or 0 for s in result.studies)
    false_positives = sum(s.false_positives or 0 for s in result.studies)
    typer.echo(f"{sum(1 for s in result.studies if s.sr_path)} of {len(result.studies)} SRs "
               f"received by the stand-in PACS in {result.seconds:.1f} s "
               f"(results in {result.pacs_folder})")
    typer.echo(f"lesions found: {hits} of {truth}, {false_positives} false positive"
               f"{'' if false_positives == 1 else 's'} (a hit: centroid within the true "
               f"radius + {MATCH_MARGIN_MM:g} mm)")
    if not result.complete:
        raise typer.Exit(1)
