"""Cleaning stages that `dsgpt prepare` composes before tokenizing, in this order:
quality filters (filters) -> PII scrubbing (pii) -> exact dedup -> near dedup (dedup) -> the
train/val split; the report (report) describes what came out. Every stage is off unless asked for
(settings: flags or a YAML file); pipeline.Cleaner runs the enabled ones over a stream.
"""

from dsgpt.data.clean.pipeline import Cleaner
from dsgpt.data.clean.settings import CleanSettings, clean_settings

__all__ = ["Cleaner", "CleanSettings", "clean_settings"]
