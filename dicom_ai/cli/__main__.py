"""``python -m dicom_ai.cli``."""

from dicom_ai.cli import app

if __name__ == "__main__":  # pragma: no cover
    app()
