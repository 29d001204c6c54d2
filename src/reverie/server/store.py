"""The job store: accepted jobs and their results in SQLite (WAL), result images as PNG files beside it, and
videos as MP4 (or GIF) files (reverie.video_io) with a PNG poster each.

A job is written before it is acknowledged, so a restart finds every accepted job: queued ones run again,
finished ones keep serving their images. Files are named only by ids the server generates (never by anything
a request sent), and written atomically (temp file, then rename).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import tempfile
import threading
from pathlib import Path

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
STATUSES = ("queued", "running", "done", "failed", "cancelled")
VIDEO_FORMATS = {"mp4": "video/mp4", "gif": "image/gif"}  # how videos are stored -> their content type

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order: the queue is FIFO across restarts
    id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,                     -- 'job' (native, survives restarts) or 'sync' (a waiting HTTP client)
    status TEXT NOT NULL,
    request TEXT NOT NULL,                  -- JSON of the engine Request
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    result TEXT                             -- JSON: {images, seeds, params, elapsed_s}; videos: + videos, ...
)
"""


class JobStore:
    """SQLite rows for jobs plus `images/<job id>-<i>.png` and `videos/<job id>-<i>.mp4` files (a video's PNG is
    its poster), under one output folder."""

    def __init__(self, root):
        self.root = Path(root)
        self.images, self.videos = self.root / "images", self.root / "videos"
        self.images.mkdir(parents=True, exist_ok=True)
        self.videos.mkdir(exist_ok=True)
        self._lock = threading.Lock()  # one connection shared by the engine's threads
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, job_id: str, kind: str, request: dict, created: float) -> None:
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, kind, status, request, created) VALUES (?, ?, 'queued', ?, ?)",
                             (job_id, kind, json.dumps(request), created))

    def update(self, job_id: str, **fields) -> None:
        """Set columns of one job: status, started, finished, error, result (a dict, stored as JSON)."""
        allowed = {"status", "started", "finished", "error", "result"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"fields must be among {sorted(allowed)}; got {sorted(fields)}")
        if "result" in fields and fields["result"] is not None:
            fields["result"] = json.dumps(fields["result"])
        columns = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))

    def get(self, job_id: str) -> dict | None:
        if not JOB_ID.match(job_id):
            return None
        with self._lock:
            row = self._db.execute("SELECT id, kind, status, request, created, started, finished, error, result "
                                   "FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row(row) if row else None

    def unfinished(self) -> list[dict]:
        """Jobs that were queued or running when the last process stopped, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, kind, status, request, created, started, finished, error, result "
                                    "FROM jobs WHERE status IN ('queued', 'running') ORDER BY seq").fetchall()
        return [_row(r) for r in rows]

    def image_path(self, job_id: str, index: int) -> Path:
        """Where image `index` of a job lives; ids are checked so no request can name another path."""
        _check_name(job_id, index)
        return self.images / f"{job_id}-{index}.png"

    def video_path(self, job_id: str, index: int, kind: str) -> Path:
        """Where video `index` of a job lives, as `kind` (mp4 or gif)."""
        _check_name(job_id, index)
        if kind not in VIDEO_FORMATS:
            raise ValueError(f"kind must be one of {sorted(VIDEO_FORMATS)}; got {kind!r}")
        return self.videos / f"{job_id}-{index}.{kind}"

    def write_video(self, job_id: str, index: int, frames, *, fps: float, params: dict, kind: str) -> Path:
        """Write a video's frames (PIL images) with its parameters (in the file and a .json side-car), atomically:
        reverie.video_io.save_video."""
        from ..video_io import save_video

        return save_video(frames, self.video_path(job_id, index, kind), fps=fps, params=params)

    def write_image(self, job_id: str, index: int, data: bytes) -> Path:
        """Write PNG bytes atomically: a reader never sees half a file."""
        path = self.image_path(job_id, index)
        fd, tmp = tempfile.mkstemp(dir=self.images, prefix=".tmp-", suffix=".png")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _check_name(job_id: str, index: int) -> None:
    if not JOB_ID.match(job_id) or isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"job id must be 32 hex digits and index an int >= 0; got {job_id!r}, {index!r}")


def _row(row) -> dict:
    job_id, kind, status, request, created, started, finished, error, result = row
    return dict(id=job_id, kind=kind, status=status, request=json.loads(request), created=created, started=started,
                finished=finished, error=error, result=json.loads(result) if result else None)
