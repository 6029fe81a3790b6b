"""The cloud worker: turns uploaded photos into cloud diagnoses in the Realtime Database, exactly once.

Modules, in the order a job meets them: ``jobs`` (the /jobs queue: transactions, leases, fenced
outcomes), ``worker`` (listener + sweep, claiming, the download / batched inference / write
pipeline, shutdown), ``fetch`` (download and hash check), ``pipeline`` and ``checks`` (decode,
image checks, batched model call, the ``cloud`` record, heatmap PNG), ``model`` (the model-directory
adapter: calibrated probabilities and Grad-CAM in one compiled pass), ``triage`` (queue score),
``registry`` (following /models/cloud/current), ``errors`` (failure reasons), ``metrics`` and
``cli`` (``dermaloop worker``).
"""
