"""Loading and validating the configuration: defaults, TOML file, environment, error messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_ai.config import Settings, load_settings
from dicom_ai.exceptions import ConfigError
from tests.peers import REPO

FULL = """\
[dicom]
ae_title = "RECEIVER"
host = "127.0.0.1"
port = 11200
allowed_calling_aets = ["CT1", "MR1"]
allowed_hosts = ["10.0.0.0/8", "192.168.1.20"]
max_associations = 8
receivers = 2
network_timeout = 30.5

[storage]
root = "/srv/dicom-ai"
database_url = "postgresql+psycopg://dicom@db/dicom"
min_free_bytes = 0
duplicates = "replace"

[completion]
series_quiet_seconds = 10
study_quiet_seconds = 20
poll_seconds = 0.5

[api]
host = "0.0.0.0"
port = 9000

[logging]
level = "DEBUG"
json_format = true

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "pacs.example.org"
port = 104
tls = true

[[sources]]
name = "archive"
ae_title = "ARCHIVE"
host = "archive.example.org"
port = 11112
retrieve = "get"

[[routes]]
name = "chest-ct"
model = "lung-nodules"
destinations = ["pacs"]
match = { Modality = "CT", BodyPartExamined = ["CHEST", "LUNG"] }
"""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No DICOM_AI_* variable of the caller's shell leaks in; no stray config in the cwd."""
    for name in list(os.environ):
        if name.startswith("DICOM_AI_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _write(tmp_path: Path, text: str, name: str = "dicom-ai.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> str:
    """The ConfigError message loading `text` produces."""
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, text))
    return str(info.value)


def test_defaults_without_a_file() -> None:
    """Without a file or environment every setting has its documented default."""
    settings = load_settings()
    assert settings.model_dump() == Settings().model_dump()
    assert settings.dicom.ae_title == "DICOM_AI"
    assert settings.dicom.port == 11112
    assert settings.dicom.allowed_calling_aets == []
    assert settings.dicom.tls_cert is None
    assert settings.storage.duplicates == "keep-first"
    assert settings.storage.url.startswith("sqlite:///")
    assert settings.api.port == 8080
    assert settings.destinations == []
    assert settings.routes == []


def test_full_file_loads(tmp_path: Path) -> None:
    """A file using every section, including the list sections, loads into typed values."""
    settings = load_settings(_write(tmp_path, FULL))
    assert settings.dicom.ae_title == "RECEIVER"
    assert settings.dicom.port == 11200
    assert settings.dicom.allowed_calling_aets == ["CT1", "MR1"]
    assert settings.dicom.allowed_hosts == ["10.0.0.0/8", "192.168.1.20"]
    assert settings.dicom.receivers == 2
    assert settings.dicom.network_timeout == 30.5
    assert settings.storage.root == Path("/srv/dicom-ai")
    assert settings.storage.url == "postgresql+psycopg://dicom@db/dicom"
    assert settings.storage.duplicates == "replace"
    assert settings.completion.series_quiet_seconds == 10.0
    assert settings.api.port == 9000
    assert settings.logging.level == "DEBUG"
    assert settings.logging.json_format is True
    assert [(d.name, d.ae_title, d.port, d.tls) for d in settings.destinations] == [
        ("pacs", "PACS", 104, True)
    ]
    assert settings.sources[0].retrieve == "get"
    route = settings.routes[0]
    assert route.destinations == ["pacs"]
    assert route.match == {"Modality": "CT", "BodyPartExamined": ["CHEST", "LUNG"]}


def test_unknown_section_is_ignored(tmp_path: Path) -> None:
    """A top-level section of a later feature does not stop the service from starting."""
    settings = load_settings(_write(tmp_path, '[future_feature]\nenabled = true\n'
                                              '[dicom]\nport = 11300\n'))
    assert settings.dicom.port == 11300
    assert not hasattr(settings, "future_feature")


def test_unknown_key_in_section_names_the_key(tmp_path: Path) -> None:
    """A typo inside a known section is an error naming ``section.key``."""
    message = _error(tmp_path, "[dicom]\nprot = 11113\n")
    assert "dicom.prot" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[dicom]\nport = 70000\n", "dicom.port"),
        ("[dicom]\nae_title = \"SEVENTEEN_CHARS_X\"\n", "dicom.ae_title"),
        ("[dicom]\nallowed_hosts = [\"not-an-ip\"]\n", "dicom.allowed_hosts"),
        ("[dicom]\nallowed_calling_aets = [\"BAD\\\\AE\"]\n", "dicom.allowed_calling_aets"),
        ("[storage]\nduplicates = \"maybe\"\n", "storage.duplicates"),
        ("[api]\nport = -1\n", "api.port"),
        ("[logging]\nlevel = \"CHATTY\"\n", "logging.level"),
        ("[[destinations]]\nname = \"x\"\nae_title = \"X\"\nhost = \"h\"\n", "destinations.0.port"),
    ],
)
def test_bad_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    """An invalid value is a ConfigError whose message names the offending key."""
    assert key in _error(tmp_path, text)


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``DICOM_AI_DICOM__PORT`` wins over the file; the file's other [dicom] keys remain."""
    path = _write(tmp_path, '[dicom]\nport = 11112\nae_title = "FILEAE"\n')
    monkeypatch.setenv("DICOM_AI_DICOM__PORT", "11113")
    settings = load_settings(path)
    assert settings.dicom.port == 11113
    assert settings.dicom.ae_title == "FILEAE"


def test_invalid_environment_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad value from the environment is reported like one from the file."""
    monkeypatch.setenv("DICOM_AI_DICOM__PORT", "99999")
    with pytest.raises(ConfigError, match=r"dicom\.port"):
        load_settings()


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``DICOM_AI_CONFIG`` names the file when no path is given."""
    monkeypatch.setenv("DICOM_AI_CONFIG", str(_write(tmp_path, "[dicom]\nport = 11400\n")))
    assert load_settings().dicom.port == 11400


def test_route_to_unknown_destination_fails(tmp_path: Path) -> None:
    """A route naming a destination that is not configured is refused at load time."""
    message = _error(tmp_path, '[[routes]]\nname = "r1"\nmodel = "m"\n'
                               'destinations = ["nowhere"]\n')
    assert "r1" in message
    assert "nowhere" in message


def test_duplicate_destination_names_fail(tmp_path: Path) -> None:
    """Two destinations with one name are refused (routes could not tell them apart)."""
    entry = '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\nport = 104\n'
    message = _error(tmp_path, entry + entry)
    assert "destinations" in message
    assert "pacs" in message


def test_missing_file_fails(tmp_path: Path) -> None:
    """A config path that does not exist is an error, not a silent fall-back to defaults."""
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(missing)


def test_toml_syntax_error_fails(tmp_path: Path) -> None:
    """A file that is not valid TOML is a ConfigError, not a traceback."""
    with pytest.raises(ConfigError):
        load_settings(_write(tmp_path, "[dicom\nport = \n"))


def test_tls_cert_without_key_fails(tmp_path: Path) -> None:
    """``tls_cert`` alone is refused: the receiver cannot serve TLS without its key."""
    message = _error(tmp_path, '[dicom]\ntls_cert = "/etc/dicom-ai/server.pem"\n')
    assert "dicom" in message
    assert "tls_key" in message


def test_cli_reports_invalid_key(tmp_path: Path) -> None:
    """``dicom-ai studies --config BAD.toml`` exits 2 and names the bad key on stderr."""
    bad = _write(tmp_path, "[dicom]\nprot = 11113\n", name="BAD.toml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_AI_")}
    result = subprocess.run(
        [sys.executable, "-m", "dicom_ai.cli", "studies", "--config", str(bad)],
        cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "dicom.prot" in result.stderr
