"""First-run publishing for ``dermaloop run``: the model directory it serves becomes version one of
the registry, so the worker and the apps always follow ``/models/{kind}/current`` (issue 19).

Only where a kind has no current version yet: once anything is published, the registry decides
and a restart never moves a pointer a maintainer set.
"""

from __future__ import annotations

from typing import Any

from dermaloop.settings import Settings


def publish_served_models(settings: Settings, options: dict[str, Any]) -> str:
    from dermaloop import registry
    from dermaloop.analysis.on_device import find_analysis_model
    from dermaloop.model_dir import newest_model_dir

    served = {}
    model_dir = newest_model_dir(settings.models_dir)
    if model_dir is not None:
        served["cloud"] = served["device"] = model_dir
    analysis = find_analysis_model(settings.models_dir)
    if analysis is not None:
        served["localiser"] = analysis.parent
    lines = []
    for kind, root in served.items():
        current = registry.current_version(kind, settings=settings)
        if current is None:
            published = registry.publish(root, kind, make_current=False, settings=settings)
            registry.promote(kind, published.version, reason=f"first start of dermaloop run, serving {root}",
                             settings=settings)
            current = published.version
            lines.append(f"{kind} {current} (published now)")
        else:
            lines.append(f"{kind} {current}")
    return "Registry: " + ", ".join(lines) if lines else "Registry: no model to publish"
