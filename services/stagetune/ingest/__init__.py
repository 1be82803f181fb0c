"""Ingest stage: dataset folders → content-addressed manifest (rows + report) in the store."""

from stagetune.core.manifest import ManifestRow, expand_repeats, load_manifest, load_report
from stagetune.ingest.run import IngestResult, run_ingest

__all__ = ["IngestResult", "ManifestRow", "expand_repeats", "load_manifest", "load_report", "run_ingest"]
