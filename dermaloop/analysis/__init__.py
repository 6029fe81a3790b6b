"""Image analysis around the classifier, shared by the patient app, the cloud worker and the portal.

* ``quality``: photo quality gate with calibrated thresholds and specific retake instructions;
* ``localiser``: lesion box geometry, auto-crop and average precision; ``analysis_model`` assembles
  the device model (frozen Lite0 trunk + box head + not-skin head);
* ``ood``: not-skin rejection;
* ``gradcam``: Grad-CAM heatmaps and PNG overlays for the reviewer portal;
* ``device_path``: the whole on-device path with per-step timings (``dermaloop diagnose``).
"""
