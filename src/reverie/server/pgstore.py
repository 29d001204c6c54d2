"""The shared job store: jobs, their progress and their result files in PostgreSQL, for any number of front ends
and workers on any machines (reverie.server.shared). SQLite (reverie.server.store) stays the embedded default.

The jobs table is the queue. A worker claims the oldest queued jobs of the models it holds, the ones that can
share a forward pass, in one transaction (`FOR UPDATE SKIP LOCKED`: workers never wait on each other's
candidates), and holds them under a lease it renews while they run. Every write a worker makes to a job it runs
(progress, the final status and the result files) is conditional on its claim — its worker id and the job's
attempt number — so a worker that lost its lease (it stalled or died and another worker claimed the job again)
changes nothing, and a job's results are written exactly once, in the same transaction as its final status.
A job whose lease expired goes back to the queue (any process notices: `requeue_expired`).

All times are the database's clock (`clock_timestamp()`, seconds since the epoch), so leases and deadlines
hold across machines whose clocks differ. Front ends learn of progress by polling the rows they watch (a
`progress_seq` counter tells a new progress event); idle workers poll for queued jobs. Polling, not
LISTEN/NOTIFY: one indexed query every `poll_s` per process, and nothing to lose when a connection drops.

The schema is created and migrated here (`MIGRATIONS`, applied in order under an advisory lock, the version in
`reverie_schema`), so a new database needs nothing but a role that may create tables.
"""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path

from .store import JOB_ID, VIDEO_FORMATS, _check_name

NOW = "extract(epoch from clock_timestamp())"
LOCK_MIGRATE, LOCK_ENQUEUE = 0x72657665, 0x72657666  # pg_advisory locks: migrations; the queue-depth check
MIGRATIONS = [
    """
    CREATE TABLE jobs (
        seq BIGSERIAL PRIMARY KEY,              -- arrival order: the queue is FIFO
        id TEXT UNIQUE NOT NULL,
        kind TEXT NOT NULL,                     -- 'job' (native API) or 'sync' (an HTTP client is waiting)
        model TEXT NOT NULL,                    -- only a worker holding it claims the job
        status TEXT NOT NULL,                   -- queued, running, done, failed, cancelled
        request TEXT NOT NULL,                  -- JSON of the engine Request (prepared by the claiming worker)
        created DOUBLE PRECISION NOT NULL,
        deadline DOUBLE PRECISION NOT NULL,     -- the job fails if not done by then (queue wait included)
        started DOUBLE PRECISION,
        finished DOUBLE PRECISION,
        error TEXT,
        failure TEXT,                           -- why it failed: invalid, deadline, internal
        result TEXT,                            -- JSON: {images, seeds, params, elapsed_s}; videos: + videos, ...
        batch TEXT,                             -- JSON of the started event: {batch_jobs, batch_images}
        progress TEXT,                          -- JSON of the latest progress event (previews included)
        progress_seq INTEGER NOT NULL DEFAULT 0,
        worker TEXT,                            -- the claim: who runs it, and which attempt
        attempt INTEGER NOT NULL DEFAULT 0,
        lease_until DOUBLE PRECISION
    );
    CREATE INDEX jobs_queued ON jobs (seq) WHERE status = 'queued';
    CREATE INDEX jobs_running ON jobs (lease_until) WHERE status = 'running';
    CREATE TABLE job_files (                    -- result images and videos: any front end serves any job's files
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        name TEXT NOT NULL,                     -- images/0.png, videos/0.mp4, videos/0.mp4.json
        data BYTEA NOT NULL,
        PRIMARY KEY (job_id, name)
    );
    CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        role TEXT NOT NULL,                     -- worker (engine only) or serve (front end + engine)
        host TEXT NOT NULL,
        models TEXT NOT NULL,                   -- JSON list of the model names it holds
        started DOUBLE PRECISION NOT NULL,
        heartbeat DOUBLE PRECISION NOT NULL
    );
    """,
]
COLUMNS = ("id", "kind", "model", "status", "request", "created", "deadline", "started", "finished", "error", "failure",
           "result", "batch", "progress", "progress_seq", "worker", "attempt", "lease_until")
JSON_COLUMNS = ("request", "result", "batch", "progress")


class QueueFull(Exception):
    def __init__(self, depth: int):
        super().__init__(f"the queue is full ({depth} jobs)")
        self.depth = depth


class PgStore:
    """Jobs, files and workers in one PostgreSQL database (`url`: postgresql://user@host:port/db). Each thread
    gets its own connection (autocommit; multi-statement changes run in explicit transactions)."""

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:
            raise ValueError("store: a PostgreSQL store needs psycopg (pip install -e '.[postgres]')") from None
        if not url.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"store must be a postgresql:// URL (postgresql://USER[:PASSWORD]@HOST:PORT/DB); got "
                             f"{url.split('@')[-1]!r}")

        self._psycopg, self.url = psycopg, url
        self._local = threading.local()
        self._connections: list = []
        self._lock = threading.Lock()
        self._staged: dict[str, dict[str, bytes]] = {}  # a running job's result files, written with its status
        try:
            self.migrate()
        except psycopg.OperationalError as e:  # the URL's credentials are not repeated
            reason = str(e).strip().splitlines()[0]
            raise ValueError(f"store: cannot reach the database at {url.split('@')[-1]}: {reason}") from None

    # --- connections and schema ------------------------------------------------------------------------

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _execute(self, sql: str, params=()):
        return self._conn().execute(sql, params)

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    def migrate(self) -> int:
        """Create or upgrade the schema to len(MIGRATIONS); returns the version. Safe to run from many processes
        at once (an advisory lock orders them)."""
        conn = self._conn()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_MIGRATE,))
            conn.execute("CREATE TABLE IF NOT EXISTS reverie_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM reverie_schema").fetchone()
            version = row[0] if row else 0
            if row is None:
                conn.execute("INSERT INTO reverie_schema VALUES (0)")
            if version > len(MIGRATIONS):
                raise RuntimeError(f"store: the database's schema is version {version}, newer than this reverie "
                                   f"knows ({len(MIGRATIONS)}); upgrade reverie")
            for sql in MIGRATIONS[version:]:
                conn.execute(sql)
            conn.execute("UPDATE reverie_schema SET version = %s", (len(MIGRATIONS),))
        return len(MIGRATIONS)

    def now(self) -> float:
        return self._execute(f"SELECT {NOW}").fetchone()[0]

    # --- what front ends do ----------------------------------------------------------------------------

    def enqueue(self, job_id: str, kind: str, model: str, request: dict, timeout_s: float, max_queue: int) -> dict:
        """Add a queued job, unless max_queue jobs are queued already (QueueFull): the check and the insert hold
        one lock, so front ends together never exceed it. Returns the row."""
        conn = self._conn()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ENQUEUE,))
            depth = conn.execute("SELECT count(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
            if depth >= max_queue:
                raise QueueFull(depth)
            conn.execute(f"INSERT INTO jobs (id, kind, model, status, request, created, deadline) "
                         f"VALUES (%s, %s, %s, 'queued', %s, {NOW}, {NOW} + %s)",
                         (job_id, kind, model, json.dumps(request), timeout_s))
        return self.get(job_id)

    def get(self, job_id: str) -> dict | None:
        if not JOB_ID.match(job_id):
            return None
        rows = self.rows([job_id])
        return rows[0] if rows else None

    def rows(self, ids: list[str]) -> list[dict]:
        """The rows of these jobs (those that exist)."""
        cursor = self._execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE id = ANY(%s)", (list(ids),))
        return [_row(r) for r in cursor.fetchall()]

    def cancel(self, job_id: str, reason: str) -> bool:
        """Cancel a queued or running job (the worker running it sees the change at its next step)."""
        row = self._execute(f"UPDATE jobs SET status = 'cancelled', finished = {NOW}, error = %s, lease_until = NULL "
                            "WHERE id = %s AND status IN ('queued', 'running') RETURNING id", (reason, job_id)).fetchone()
        return row is not None

    def position(self, job_id: str) -> int | None:
        """Queued jobs ahead of this one (0: next), None if it is not queued."""
        row = self._execute("SELECT (SELECT count(*) FROM jobs q WHERE q.status = 'queued' AND q.seq < j.seq) "
                            "FROM jobs j WHERE j.id = %s AND j.status = 'queued'", (job_id,)).fetchone()
        return None if row is None else row[0]

    def depth(self) -> int:
        return self._execute("SELECT count(*) FROM jobs WHERE status = 'queued'").fetchone()[0]

    def queued_images(self) -> int:
        row = self._execute("SELECT coalesce(sum((request::json->>'n')::int), 0) FROM jobs "
                            "WHERE status = 'queued'").fetchone()
        return int(row[0])

    def read_file(self, job_id: str, name: str) -> bytes | None:
        row = self._execute("SELECT data FROM job_files WHERE job_id = %s AND name = %s", (job_id, name)).fetchone()
        return None if row is None else bytes(row[0])

    # --- what workers do -------------------------------------------------------------------------------

    def claim(self, worker: str, models: list[str], choose, *, lease_s: float, limit: int) -> list[dict]:
        """Claim a batch: lock up to `limit` of the oldest queued jobs of `models` (skipping rows another worker
        has locked), let choose(rows) -> (picked: [(row, prepared request)], invalid: [(row, error)]) decide,
        fail the invalid ones, and mark the picked ones running under this worker's lease, attempt + 1. The
        rows not picked stay queued. Returns the picked rows as claimed (attempt, remaining seconds to the
        deadline as "remaining")."""
        conn = self._conn()
        with conn.transaction():
            cursor = conn.execute(f"SELECT {', '.join(COLUMNS)}, deadline - {NOW} FROM jobs "
                                  "WHERE status = 'queued' AND model = ANY(%s) ORDER BY seq LIMIT %s "
                                  "FOR UPDATE SKIP LOCKED", (list(models), limit))
            rows = []
            for r in cursor.fetchall():
                row = _row(r[:-1])
                row["remaining"] = r[-1]
                rows.append(row)
            if not rows:
                return []
            picked, invalid = choose(rows)
            for row, error in invalid:
                conn.execute(f"UPDATE jobs SET status = 'failed', failure = 'invalid', error = %s, finished = {NOW} "
                             "WHERE id = %s", (error, row["id"]))
            claimed = []
            batch = json.dumps({"batch_jobs": len(picked),
                                "batch_images": sum(request["n"] for _, request in picked)})
            for row, request in picked:
                started, attempt = conn.execute(
                    f"UPDATE jobs SET status = 'running', worker = %s, attempt = attempt + 1, lease_until = {NOW} + %s, "
                    f"started = {NOW}, request = %s, batch = %s, progress = NULL WHERE id = %s "
                    "RETURNING started, attempt", (worker, lease_s, json.dumps(request), batch, row["id"])).fetchone()
                claimed.append(dict(row, status="running", worker=worker, attempt=attempt, started=started,
                                    request=request))
        return claimed

    def progress(self, worker: str, updates: list[tuple[str, int, dict]], lease_s: float) -> set[str]:
        """Record each (job id, attempt, progress data) of a running batch and renew its lease; returns the ids
        still this worker's (a cancelled job, or one whose lease expired and was claimed again, is not)."""
        return self._mine(worker, [(i, a, json.dumps(d)) for i, a, d in updates], lease_s,
                          "progress = %s, progress_seq = progress_seq + 1, ")

    def renew(self, worker: str, claims: list[tuple[str, int]], lease_s: float) -> set[str]:
        """Renew the leases of (job id, attempt); returns the ids still this worker's."""
        return self._mine(worker, claims, lease_s, "")

    def _mine(self, worker: str, items: list[tuple], lease_s: float, assign: str) -> set[str]:
        kept = set()
        conn = self._conn()
        with conn.transaction():
            for job_id, attempt, *data in items:
                row = conn.execute(f"UPDATE jobs SET {assign}lease_until = {NOW} + %s WHERE id = %s AND worker = %s "
                                   "AND attempt = %s AND status = 'running' RETURNING id",
                                   (*data, lease_s, job_id, worker, attempt)).fetchone()
                if row is not None:
                    kept.add(job_id)
        return kept

    def write_image(self, job_id: str, index: int, data: bytes) -> None:
        """Stage a running job's PNG; it is stored by `finish`, with the job's final status."""
        _check_name(job_id, index)
        self._staged.setdefault(job_id, {})[f"images/{index}.png"] = data

    def write_video(self, job_id: str, index: int, frames, *, fps: float, params: dict, kind: str) -> None:
        """Encode and stage a running job's video (and its .json side-car) for `finish`."""
        from ..video_io import save_video

        _check_name(job_id, index)
        if kind not in VIDEO_FORMATS:
            raise ValueError(f"kind must be one of {sorted(VIDEO_FORMATS)}; got {kind!r}")
        with tempfile.TemporaryDirectory() as tmp:
            save_video(frames, Path(tmp) / f"{index}.{kind}", fps=fps, params=params)
            for file in Path(tmp).iterdir():
                self._staged.setdefault(job_id, {})[f"videos/{file.name}"] = file.read_bytes()

    def discard(self, job_id: str) -> None:
        """Drop a job's staged files (it ended without delivering them)."""
        self._staged.pop(job_id, None)

    def finish(self, worker: str | None, job_id: str, attempt: int | None, status: str, *, error=None,
               failure=None, result=None) -> bool:
        """Make a job final and store its staged files, in one transaction, if it is still running under this
        claim (worker None: any unfinished job, as a cancellation). Returns whether it changed; the staged files
        are dropped either way."""
        files = self._staged.pop(job_id, {})
        conn = self._conn()
        with conn.transaction():
            if worker is None:
                where, params = "status IN ('queued', 'running')", ()
            else:
                where, params = "worker = %s AND attempt = %s AND status = 'running'", (worker, attempt)
            row = conn.execute(f"UPDATE jobs SET status = %s, finished = {NOW}, error = %s, failure = %s, result = %s, "
                               f"lease_until = NULL WHERE id = %s AND {where} RETURNING id",
                               (status, error, failure, None if result is None else json.dumps(result), job_id,
                                *params)).fetchone()
            if row is None:
                return False
            for name, data in files.items():
                conn.execute("INSERT INTO job_files (job_id, name, data) VALUES (%s, %s, %s)", (job_id, name, data))
        return True

    def release(self, worker: str, job_id: str, attempt: int) -> bool:
        """Give a claimed job back to the queue (a worker shutting down past its grace period)."""
        self._staged.pop(job_id, None)
        row = self._execute("UPDATE jobs SET status = 'queued', worker = NULL, lease_until = NULL, started = NULL, "
                            "progress = NULL WHERE id = %s AND worker = %s AND attempt = %s AND status = 'running' "
                            "RETURNING id", (job_id, worker, attempt)).fetchone()
        return row is not None

    # --- what every process does now and then ----------------------------------------------------------

    def requeue_expired(self) -> list[str]:
        """Put running jobs whose lease expired (their worker died or stalled) back in the queue."""
        cursor = self._execute(f"UPDATE jobs SET status = 'queued', worker = NULL, lease_until = NULL, started = NULL, "
                               f"progress = NULL WHERE status = 'running' AND lease_until < {NOW} RETURNING id")
        return [r[0] for r in cursor.fetchall()]

    def expire_deadlines(self, message: str) -> list[str]:
        """Fail queued jobs past their deadline."""
        cursor = self._execute(f"UPDATE jobs SET status = 'failed', failure = 'deadline', error = %s, finished = {NOW} "
                               f"WHERE status = 'queued' AND deadline < {NOW} RETURNING id", (message,))
        return [r[0] for r in cursor.fetchall()]

    def heartbeat(self, worker: str, role: str, host: str, models: list[str]) -> None:
        self._execute(f"INSERT INTO workers (id, role, host, models, started, heartbeat) VALUES "
                      f"(%s, %s, %s, %s, {NOW}, {NOW}) ON CONFLICT (id) DO UPDATE SET heartbeat = {NOW}, "
                      "models = excluded.models", (worker, role, host, json.dumps(models)))

    def leave(self, worker: str) -> None:
        self._execute("DELETE FROM workers WHERE id = %s", (worker,))

    def workers(self, alive_s: float) -> list[dict]:
        """Workers whose last heartbeat is at most alive_s old."""
        cursor = self._execute(f"SELECT id, role, host, models, started, heartbeat FROM workers "
                               f"WHERE heartbeat > {NOW} - %s ORDER BY started", (alive_s,))
        return [dict(id=i, role=r, host=h, models=json.loads(m), started=s, heartbeat=b)
                for i, r, h, m, s, b in cursor.fetchall()]


def _row(values) -> dict:
    row = dict(zip(COLUMNS, values))
    for name in JSON_COLUMNS:
        if row[name] is not None:
            row[name] = json.loads(row[name])
    return row
