"""The manifest: one row per ingested file, the contract between ingest and later stages."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class ManifestRow:
    """What ingest learned about one file; `error` is '<reason>: <detail>' or empty."""

    path: str
    label: str
    sha256: str
    phash: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""
    bytes: int = 0
    decodable: bool = False
    error: str = ""

    @property
    def reason(self) -> str:
        """The short reason code of the error (`truncated`, `not_an_image`, ...)."""
        return self.error.split(":", 1)[0] if self.error else ""


MANIFEST_COLUMNS = tuple(f.name for f in fields(ManifestRow))


def write_manifest(rows: list[ManifestRow], path: Path) -> None:
    """Write rows sorted by path, so the same files give a byte-identical manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in sorted(rows, key=lambda r: r.path):
            writer.writerow(asdict(row))


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest with its column types (labels and hashes stay strings)."""
    frame = pd.read_csv(
        path,
        dtype={
            "path": str,
            "label": str,
            "sha256": str,
            "phash": str,
            "mode": str,
            "format": str,
            "error": str,
        },
        keep_default_na=False,
        encoding="utf-8",
    )
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; re-run `python -m pipeline ingest`")
    frame["decodable"] = frame["decodable"].astype(str).str.lower() == "true"
    return frame
