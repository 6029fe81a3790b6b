"""DermaLoop's shared library: settings, Firebase service modules, models and image analysis."""

__version__ = "0.1.0"

DISCLAIMER = (
    "DermaLoop gives an automated risk estimate, not a diagnosis. "
    "See a doctor about any skin change that worries you, whatever the result."
)
