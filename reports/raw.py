"""Raw rows on disk: CSV for spreadsheets, JSON ({"metadata": ..., "rows": [...]}) to re-render from."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd


def _plain(value: object) -> object:
    """JSON-safe scalar: NaN/inf/NA -> None, numpy scalars -> Python ones."""
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def rows_json(frame: pd.DataFrame, metadata: Mapping[str, object]) -> str:
    """The JSON text written by `write_raw` (strict JSON: missing numbers are null)."""
    rows = [{c: _plain(v) for c, v in zip(frame.columns, row)} for row in frame.itertuples(index=False, name=None)]
    payload = {"metadata": {str(k): _plain(v) if not isinstance(v, (dict, list)) else v for k, v in metadata.items()},
               "columns": [str(c) for c in frame.columns], "rows": rows}
    return json.dumps(payload, indent=1, allow_nan=False, default=str)


def write_raw(frame: pd.DataFrame, metadata: Mapping[str, object], directory: str | Path,
              stem: str = "results") -> tuple[Path, Path]:
    """Write `<stem>.csv` and `<stem>.json` under `directory`; return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = directory / f"{stem}.csv", directory / f"{stem}.json"
    frame.to_csv(csv_path, index=False)
    json_path.write_text(rows_json(frame, metadata), encoding="utf-8")
    return csv_path, json_path


def read_raw(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read a `write_raw` JSON file back: (DataFrame with the saved column order, metadata)."""
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(payload, dict) or "rows" not in payload:
        raise ValueError(f"path {str(path)!r} is not a results JSON file (expected keys 'rows', 'metadata')")
    columns = payload.get("columns") or (list(payload["rows"][0]) if payload["rows"] else [])
    frame = pd.DataFrame(payload["rows"], columns=columns)
    return frame, dict(payload.get("metadata") or {})
