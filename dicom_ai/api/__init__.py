"""The HTTP API: health, readiness, Prometheus metrics, and authenticated data and actions.

:func:`dicom_ai.api.app.create_app` builds the FastAPI application;
:class:`dicom_ai.api.server.ApiServer` runs it with uvicorn in a thread of ``dicom-ai serve``.
"""
