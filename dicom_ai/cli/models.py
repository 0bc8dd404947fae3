"""The model registry: ``models list``, ``add``, ``activate``, ``show``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dicom_ai.cli._common import (
    CommandContext,
    ConfigOption,
    _emit,
    _print_json,
    command_context,
)


def _registry(ctx: CommandContext) -> Any:
    from dicom_ai.inference.registry import Registry

    return Registry(ctx.settings.storage.root / "models")


def _model_folder(model: str, ctx: CommandContext) -> tuple[Path, Any]:
    """A model folder and its spec from a folder path or a registered NAME[@VERSION]."""
    from dicom_ai.inference.spec import read_spec

    candidate = Path(model)
    if candidate.is_dir():
        return candidate, read_spec(candidate)
    name, _, version = model.partition("@")
    entry = _registry(ctx).get(name, version or None)
    return entry.path, entry.spec


def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """List every model version (the bundled default first) and which one is active."""
    from dicom_ai.views import model_view

    with command_context(config) as ctx:
        entries = _registry(ctx).entries()
    if as_json:
        _print_json([model_view(e) for e in entries])
        return
    table = Table("name", "version", "task", "active", "backend", "applies to", "source")
    for e in entries:
        applies = "/".join(e.spec.modalities) or "any"
        if e.spec.body_parts:
            applies += " " + "/".join(e.spec.body_parts)
        table.add_row(e.name, e.version, e.spec.task, "yes" if e.active else "", e.spec.backend,
                      applies, "bundled" if e.bundled else "registry")
    _emit(table)


def models_add(
    path: Annotated[Path, typer.Argument(help="A model folder (spec.json + network).",
                                         exists=True, file_okay=False)],
    activate: Annotated[bool | None, typer.Option(
        "--activate/--no-activate", help="Make it active (default: only if none is).")] = None,
    config: ConfigOption = None,
) -> None:
    """Copy a model folder into the registry as NAME/VERSION."""
    with command_context(config) as ctx:
        entry = _registry(ctx).add(path, activate=activate)
    state = "active" if entry.active else "not active"
    typer.echo(f"added {entry.name} {entry.version} ({state})")


def models_activate(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Version to make active.")],
    config: ConfigOption = None,
) -> None:
    """Make VERSION the active version of NAME (what routes to NAME run)."""
    with command_context(config) as ctx:
        entry = _registry(ctx).activate(name, version)
    typer.echo(f"{entry.name} {entry.version} is active")


def models_show(
    name: Annotated[str, typer.Argument(help="Model name (NAME or NAME@VERSION).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Show a model's spec (the active version unless one is named) and its versions."""
    from dicom_ai.inference.registry import network_sha256
    from dicom_ai.views import ModelDetailView, ModelVersionView, model_view

    base, _, version = name.partition("@")
    with command_context(config) as ctx:
        registry = _registry(ctx)
        entry = registry.get(base, version or None)
        versions = registry.versions(base)
    shown = ModelDetailView(
        **dict(model_view(entry)), network_sha256=network_sha256(entry),
        versions=[ModelVersionView(version=v.version, active=v.active, bundled=v.bundled)
                  for v in versions],
        spec=json.loads(entry.spec.model_dump_json()))
    if as_json:
        _print_json(shown)
        return
    typer.echo(_describe_model(shown.model_dump(mode="json")))


def _describe_model(shown: dict[str, Any]) -> str:
    spec = shown["spec"]
    prep = spec["preprocessing"]
    lines = [
        f"{shown['name']} {shown['version']} ({shown['task']}, {shown['backend']}"
        f"{', bundled' if shown['bundled'] else ''}{', active' if shown['active'] else ''})",
        f"  {spec['description']}" if spec["description"] else "",
        f"  input: {prep['input_shape'][0]}x{prep['input_shape'][1]}x{prep['channels']}, "
        f"window {prep['window'] or 'from the file'}, {prep['normalization']} normalisation",
        f"  applies to: {'/'.join(spec['modalities']) or 'any modality'}, "
        f"{'/'.join(spec['body_parts']) or 'any body part'}",
    ]
    for output in spec["outputs"]:
        finding = output["finding"]
        lines.append(f"  output {output['name']}: ({finding['value']}, {finding['scheme']}, "
                     f"\"{finding['meaning']}\") threshold {output['threshold']:.3f} "
                     f"({output['threshold_method']})")
    provenance = spec["provenance"]
    lines.append(f"  trained: {provenance['created']} by {provenance['code_version'] or '?'} on "
                 f"{provenance['training_data'] or '?'}")
    if provenance["metrics"]:
        lines.append("  metrics: " + ", ".join(f"{k} {v:.3f}"
                                               for k, v in provenance["metrics"].items()))
    lines.append(f"  network sha256: {shown['network_sha256']}")
    lines.append("  versions: " + ", ".join(
        v["version"] + (" (active)" if v["active"] else "") for v in shown["versions"]))
    return "\n".join(line for line in lines if line)

