"""Synthetic UIDs name one content: never shared across seeds, arguments or the demo."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dicom_ai import demo
from dicom_ai.cli import app as cli_app
from dicom_ai.training.synth import synthesize


def _uids(folder: Path) -> set[str]:
    with (folder / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    return {row[key] for row in rows
            for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}


class _StopError(Exception):
    pass


def _demo_synth_arguments(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The arguments ``run_demo`` (seed 7, as ``dicom-ai demo``) gives ``synthesize``."""
    seen: dict[str, Any] = {}

    def capture(out: Path, **kwargs: Any) -> None:
        seen.update(kwargs)
        raise _StopError

    monkeypatch.setattr(demo, "synthesize", capture)
    with pytest.raises(_StopError):
        demo.run_demo(tmp, studies=2, seed=7)
    return seen


def test_synth_seed_7_never_makes_the_demos_uids(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arguments = _demo_synth_arguments(tmp_path / "demo-work", monkeypatch)
    synthesize(tmp_path / "demo", **arguments)
    # `dicom-ai synth` with the demo's seed, its defaults, and the demo's own content options.
    for n, extra in enumerate(([], ["--difficulty", "0.3"])):
        out = tmp_path / f"synth{n}"
        result = CliRunner().invoke(cli_app, ["synth", "--out", str(out), "--studies", "2",
                                              "--seed", "7", *extra])
        assert result.exit_code == 0, result.output
        assert not _uids(out) & _uids(tmp_path / "demo")


def test_uids_follow_every_content_argument(tmp_path: Path) -> None:
    def run(name: str, **changes: Any) -> set[str]:
        arguments: dict[str, Any] = {"studies": 2, "seed": 7, "modality": "CR",
                                     "positive_fraction": 0.5, "difficulty": 0.5}
        synthesize(tmp_path / name, **{**arguments, **changes})
        return _uids(tmp_path / name)

    base = run("base")
    assert run("again") == base  # same arguments: same files, same UIDs
    assert run("uncompressed", compress=False) == base  # same pixels, other syntaxes
    variants: dict[str, dict[str, Any]] = {
        "seed": {"seed": 8}, "studies": {"studies": 3}, "fraction": {"positive_fraction": 1.0},
        "difficulty": {"difficulty": 0.3}, "namespace": {"namespace": "other"}}
    for name, changes in variants.items():
        assert not run(name, **changes) & base, name
