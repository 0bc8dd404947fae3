"""The job runner: the top of the model stack, above every stage it chains.

:mod:`~dicom_ai.runner.run` takes a job row, loads its series (:mod:`dicom_ai.pipeline.loading`),
preprocesses and runs the model (:mod:`dicom_ai.inference`), turns outputs into findings
(:mod:`dicom_ai.values`), builds the DICOM results (:mod:`dicom_ai.reporting`) and stores them
(:mod:`storage.jobs`). :mod:`~dicom_ai.runner.warmup` builds each kind of report once at start.
Nothing in the stack below imports this package; the dispatchers and the API do.
"""
