"""The model registry: versioned model folders side by side, one active version per name.

Layout under the data folder (``<storage.root>/models``)::

    models/
        chest-nodule/
            ACTIVE              the active version (one line); absent: the highest version
                                (``add`` writes it, so adding a version never switches models)
            1.1.0/              a model folder (spec.json + network), copied in by ``add``
        ...

The models bundled with the package (``dicom_ai/inference/bundled/<name>/<version>/``) are
always available, read-only, and listed first; a registered version of the same name sits beside
them and can be activated instead. Folders are copied in through a temporary folder and a rename,
so a reader never sees half a model. No TensorFlow here: listing and resolving models is cheap.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dicom_ai.exceptions import ConfigError
from dicom_ai.inference.spec import ModelSpec, ModelSpecError, read_spec
from storage.filestore import fsync_dir, fsync_file

__all__ = [
    "BUNDLED_ROOT",
    "DEFAULT_MODEL",
    "ModelEntry",
    "Registry",
    "RegistryError",
    "network_sha256",
    "version_key",
]

#: Where the package's own models live.
BUNDLED_ROOT = Path(__file__).resolve().parent / "bundled"
#: The bundled default classifier, listed first.
DEFAULT_MODEL = "chest-nodule"
ACTIVE_FILE = "ACTIVE"


class RegistryError(ConfigError):
    """A model or version is unknown, or a registry operation cannot be done."""


@dataclass(frozen=True)
class ModelEntry:
    """One model version in the registry.

    Attributes
    ----------
    spec : ModelSpec
        The validated spec.
    path : Path
        The model folder.
    active : bool
        Whether this is the active version of its name.
    bundled : bool
        Shipped with the package (read-only).
    """

    spec: ModelSpec
    path: Path
    active: bool
    bundled: bool

    @property
    def name(self) -> str:
        """The model name."""
        return self.spec.name

    @property
    def version(self) -> str:
        """The model version."""
        return self.spec.version

    def summary(self) -> dict[str, object]:
        """The fields ``dicom-ai models list --json`` prints.

        Returns
        -------
        dict
            ``name, version, task, active, bundled, backend, modalities, body_parts,
            description, path``.
        """
        return {
            "name": self.name,
            "version": self.version,
            "task": self.spec.task,
            "active": self.active,
            "bundled": self.bundled,
            "backend": self.spec.backend,
            "modalities": list(self.spec.modalities),
            "body_parts": list(self.spec.body_parts),
            "description": self.spec.description,
            "path": str(self.path),
        }


def version_key(version: str) -> tuple[tuple[int, ...], int, str]:
    """Sort key of a version string: numeric parts, then releases after pre-releases.

    Parameters
    ----------
    version : str
        ``MAJOR[.MINOR[.PATCH]][-suffix]``.

    Returns
    -------
    tuple
        ``1.10.0`` sorts after ``1.9.0``; ``1.0.0-rc1`` before ``1.0.0``.
    """
    match = re.match(r"^([0-9]+(?:\.[0-9]+)*)(.*)$", version)
    if not match:
        return ((), 0, version)
    numbers = tuple(int(part) for part in match.group(1).split("."))
    numbers += (0,) * (3 - len(numbers))
    suffix = match.group(2)
    return (numbers, 0 if suffix.startswith("-") else 1, suffix)


class Registry:
    """Versioned model folders under ``root``, plus the bundled ones.

    Parameters
    ----------
    root : Path
        The registry folder, normally ``<storage.root>/models`` (created on first ``add``).
    bundled_root : Path, optional
        Where bundled models live; ``None`` for none (tests).
    """

    def __init__(self, root: Path, bundled_root: Path | None = BUNDLED_ROOT) -> None:
        self.root = Path(root)
        self.bundled_root = bundled_root

    # -- reading --------------------------------------------------------------------------------
    def _folders(self) -> list[tuple[Path, bool]]:
        """Every model folder: (path, bundled)."""
        found: list[tuple[Path, bool]] = []
        for base, bundled in ((self.bundled_root, True), (self.root, False)):
            if base is None or not base.is_dir():
                continue
            for name_dir in sorted(p for p in base.iterdir() if p.is_dir()):
                for version_dir in sorted(p for p in name_dir.iterdir() if p.is_dir()):
                    if (version_dir / "spec.json").is_file():
                        found.append((version_dir, bundled))
        return found

    def _active_version(self, name: str, versions: list[str]) -> str | None:
        pointer = self.root / name / ACTIVE_FILE
        if pointer.is_file():
            wanted = pointer.read_text(encoding="utf-8").strip()
            if wanted in versions:
                return wanted
        return max(versions, key=version_key) if versions else None

    def entries(self) -> list[ModelEntry]:
        """Every model version: the bundled default first, then by name and version.

        Returns
        -------
        list of ModelEntry

        Raises
        ------
        RegistryError
            A folder's spec is invalid, or its folder names disagree with its spec.
        """
        loaded: list[tuple[ModelSpec, Path, bool]] = []
        for path, bundled in self._folders():
            try:
                spec = read_spec(path)
            except ModelSpecError as exc:
                raise RegistryError(f"registry: {exc}") from None
            if (spec.name, spec.version) != (path.parent.name, path.name):
                raise RegistryError(f"registry: {path} holds {spec.name} {spec.version}; the "
                                    "folder must be <name>/<version>")
            loaded.append((spec, path, bundled))
        by_name: dict[str, list[str]] = {}
        for spec, _, _ in loaded:
            by_name.setdefault(spec.name, []).append(spec.version)
        active = {name: self._active_version(name, versions) for name, versions in by_name.items()}
        entries = [
            ModelEntry(spec, path, active[spec.name] == spec.version, bundled)
            for spec, path, bundled in loaded
        ]
        entries.sort(key=lambda e: (e.name != DEFAULT_MODEL, not e.bundled, e.name,
                                    version_key(e.version)))
        return entries

    def versions(self, name: str) -> list[ModelEntry]:
        """All versions of ``name``, oldest first.

        Raises
        ------
        RegistryError
            No model of that name.
        """
        found = [e for e in self.entries() if e.name == name]
        if not found:
            known = sorted({e.name for e in self.entries()})
            raise RegistryError(f"no model named {name!r}; known: {', '.join(known) or 'none'}")
        return sorted(found, key=lambda e: version_key(e.version))

    def get(self, name: str, version: str | None = None) -> ModelEntry:
        """One version of a model; the active one when ``version`` is ``None``.

        Raises
        ------
        RegistryError
            Unknown name or version.
        """
        versions = self.versions(name)
        for entry in versions:
            if (version is None and entry.active) or entry.version == version:
                return entry
        raise RegistryError(f"model {name!r} has no version {version!r}; versions: "
                            f"{', '.join(e.version for e in versions)}")

    # -- writing --------------------------------------------------------------------------------
    def add(self, source: Path, *, activate: bool | None = None) -> ModelEntry:
        """Copy a model folder into the registry as ``<name>/<version>``.

        Parameters
        ----------
        source : Path
            A model folder (spec.json + its network file).
        activate : bool, optional
            Make it the active version; by default only when the name has no active version
            in the registry yet.

        Returns
        -------
        ModelEntry

        Raises
        ------
        RegistryError
            Invalid folder, or that name and version exist already (versions are immutable).
        """
        try:
            spec = read_spec(source)
        except ModelSpecError as exc:
            raise RegistryError(str(exc)) from None
        existing = [e for e in self.entries() if e.name == spec.name]
        if any(e.version == spec.version for e in existing):
            raise RegistryError(f"{spec.name} {spec.version} is already registered; versions are "
                                "immutable: give the new model another version")
        name_dir = self.root / spec.name
        name_dir.mkdir(parents=True, exist_ok=True)
        current = next((e for e in existing if e.active), None)
        if current is not None and not (name_dir / ACTIVE_FILE).is_file():
            # Pin what runs now, so a higher version being added does not silently replace it.
            self.activate(spec.name, current.version)
        target = name_dir / spec.version
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.version}.", dir=name_dir))
        try:
            shutil.copytree(source, staging, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("checkpoints"))
            _fsync_tree(staging)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(name_dir)
        if activate or (activate is None and current is None):
            self.activate(spec.name, spec.version)
        return self.get(spec.name, spec.version)

    def activate(self, name: str, version: str) -> ModelEntry:
        """Make ``version`` the active version of ``name`` (an atomic pointer file).

        Raises
        ------
        RegistryError
            Unknown name or version.
        """
        self.get(name, version)  # raises for an unknown one
        name_dir = self.root / name
        name_dir.mkdir(parents=True, exist_ok=True)
        tmp = name_dir / f".{ACTIVE_FILE}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(version + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(name_dir / ACTIVE_FILE)
        fsync_dir(name_dir)
        return self.get(name, version)


def network_sha256(entry: ModelEntry) -> str:
    """SHA-256 of a model's network file (recorded with findings and shown by ``models show``).

    Parameters
    ----------
    entry : ModelEntry

    Returns
    -------
    str
        Hex digest.
    """
    digest = hashlib.sha256()
    with open(entry.path / entry.spec.network, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fsync_file(path)
    fsync_dir(folder)
