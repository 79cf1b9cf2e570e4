"""The prediction log: every served prediction, shadow answer, feedback label and batch cut, append-only.

    <serve.log_dir>/log/<UTC start>-<pid>-<n>.jsonl   one JSON record per line, never rewritten
    <serve.log_dir>/images/<sha256[:2]>/<sha256>.<ext> the served images (serve.store_images)

Records (each has `kind` and `time`):

    prediction  id, index, model, version, label, endpoint, predicted_class, confidence,
                probabilities {class: p}, latency_ms, sha256, image {width, height, bytes, format},
                stored (the image's path under log_dir, or null)
    shadow      id, index, version (the challenger's), label ("canary"), predicted_class, confidence,
                probabilities, champion_version, agrees
    feedback    id, index, label, previous (the label it replaces, or null), correction
    cut         batch, labelled, destination, images [[id, index, label|null, stored], ...]

A request's records are written in the request's own thread (one `os.write`
of whole lines on an O_APPEND file, so they are in the kernel before the
client gets its answer and survive the process being killed; no thread hop,
which cost more than the write). `fsync` runs every `serve.log_fsync_seconds`
in a background thread (0: before each answer), bounding what a machine crash
could lose. Files roll at
`serve.log_roll_mb` or `serve.log_roll_minutes`; each process writes its own
files, so several uvicorn workers never interleave a line.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)

LOG_FOLDER, IMAGE_FOLDER = "log", "images"
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "GIF": ".gif", "WEBP": ".webp"}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class ImageToLog:
    """A served image waiting for its record: the bytes are hashed, inspected and stored by the writer."""

    data: bytes
    record: dict[str, Any]
    size: tuple[int, int, str] | None = None  # (width, height, format) when the caller knows them


def describe_image(data: bytes, size: tuple[int, int, str] | None = None) -> tuple[str, dict[str, Any]]:
    """The image's sha256 and {width, height, bytes, format} (its header is read unless `size` says)."""
    digest = hashlib.sha256(data).hexdigest()
    if size is not None:
        return digest, {"width": size[0], "height": size[1], "format": size[2], "bytes": len(data)}
    try:
        with Image.open(io.BytesIO(data)) as image:
            info = {"width": image.width, "height": image.height, "format": image.format}
    except Exception:  # checked before it was served; a record is still written
        info = {"width": None, "height": None, "format": None}
    return digest, {**info, "bytes": len(data)}


class PredictionLog:
    """Appends records from one process to its own rolled JSONL files.

    Args:
        folder: serve.log_dir.
        store_images: keep each image under images/ (content-addressed: a repeat is stored once).
        roll_bytes / roll_seconds: start a new file at this size or age.
        fsync_seconds: fsync this often (a background thread); 0 before every answer.
        on_written: called with each record once it is written, before `append` returns.
    """

    def __init__(
        self,
        folder: Path,
        store_images: bool = True,
        roll_bytes: int = 64 * 1024 * 1024,
        roll_seconds: float = 3600.0,
        fsync_seconds: float = 1.0,
        on_written: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.folder = folder
        self.store_images = store_images
        self.roll_bytes, self.roll_seconds, self.fsync_seconds = roll_bytes, roll_seconds, fsync_seconds
        self.on_written = on_written
        (folder / LOG_FOLDER).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._file: Path | None = None
        self._opened_at = 0.0
        self._size = 0
        self._files = 0
        self._dirty = False
        self.own_files: set[Path] = set()
        self.errors = 0
        self._root = str(folder)
        self._stored: set[str] = set()  # digests of images this process has stored
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        if fsync_seconds > 0:
            self._syncer = threading.Thread(target=self._sync_loop, name="prediction-log-fsync", daemon=True)
            self._syncer.start()

    def append(self, records: list[dict[str, Any]], images: list[ImageToLog] | None = None) -> Future[None]:
        """Write records now (images hashed, inspected and stored into their records first).

        Written in this call, without a thread hop: one `os.write` of whole lines on an O_APPEND
        file, so the records are in the kernel (they survive this process being killed) before
        the caller answers its client. Returns a done future (failed when the disk refused).
        """
        done: Future[None] = Future()
        try:
            for image in images or []:
                self._fill(image)
            lines = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
            with self._lock:
                self._write(lines)
        except Exception as error:  # a full disk: the request gets its error, the log goes on
            self.errors += 1
            log.exception("the prediction log could not be written in %s", self.folder)
            done.set_exception(error)
            return done
        if self.on_written is not None:  # before the answer: a client's next call sees its records
            for record in records:
                try:
                    self.on_written(record)
                except Exception:
                    log.exception("a prediction-log listener failed on %s", record.get("kind"))
        done.set_result(None)
        return done

    def close(self) -> None:
        """fsync and close the file; stop the fsync thread."""
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(timeout=30)
        with self._lock:
            if self._fd is not None:
                self._sync_locked()
                os.close(self._fd)
                self._fd = None

    @property
    def current_file(self) -> Path | None:
        return self._file

    def _write(self, lines: bytes) -> None:
        if not lines:
            return
        self._roll_if_due(len(lines))
        assert self._fd is not None
        written = 0
        try:
            while written < len(lines):  # os.write may write part of a large buffer
                written += os.write(self._fd, lines[written:])
        except OSError:
            if written:  # end the torn line (a full disk), so the next record starts a line of its own
                with contextlib.suppress(OSError):
                    os.write(self._fd, b"\n")
            raise
        self._size += len(lines)
        self._dirty = True
        if self.fsync_seconds == 0:
            self._sync_locked()

    def _fill(self, image: ImageToLog) -> None:
        digest, info = describe_image(image.data, image.size)
        image.record.update(sha256=digest, image=info, stored=None)
        if self.store_images:
            # String paths, not pathlib: this runs for every image served, on the request's thread.
            relative = f"{IMAGE_FOLDER}/{digest[:2]}/{digest}{EXTENSIONS.get(str(info['format']), '.img')}"
            if digest not in self._stored:
                target = os.path.join(self._root, relative)
                if not os.path.exists(target):
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    partial = f"{target}.{os.getpid()}.{threading.get_ident()}.part"
                    with open(partial, "wb") as handle:
                        handle.write(image.data)
                    os.replace(partial, target)  # whole or absent
                if len(self._stored) > 100_000:  # a memo of what is on disk, not a record of it
                    self._stored.clear()
                self._stored.add(digest)
            image.record["stored"] = relative

    def _roll_if_due(self, incoming: int) -> None:
        age = time.monotonic() - self._opened_at
        if self._fd is not None and self._size + incoming <= self.roll_bytes and age < self.roll_seconds:
            return
        if self._fd is not None:
            self._sync_locked()
            os.close(self._fd)
        self._files += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        self._file = self.folder / LOG_FOLDER / f"{stamp}-{os.getpid()}-{self._files}.jsonl"
        self._fd = os.open(self._file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o644)
        self.own_files.add(self._file)
        self._opened_at, self._size = time.monotonic(), 0
        log.info("prediction log: writing %s", self._file)

    def _sync_locked(self) -> None:
        if self._fd is not None and self._dirty:
            os.fsync(self._fd)
            self._dirty = False

    def _sync_loop(self) -> None:
        """fsync every fsync_seconds, outside the lock (on a duplicate of the descriptor)."""
        while not self._stop.wait(self.fsync_seconds):
            with self._lock:
                if self._fd is None or not self._dirty:
                    continue
                fd, self._dirty = os.dup(self._fd), False
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def log_files(folder: Path) -> list[Path]:
    """Every log file under `<folder>/log/`, oldest first (names start with their UTC start time)."""
    return sorted((folder / LOG_FOLDER).glob("*.jsonl")) if (folder / LOG_FOLDER).is_dir() else []


def read_records(folder: Path) -> Iterator[dict[str, Any]]:
    """Every complete record of every log file, oldest file first (a torn last line is skipped)."""
    for path in log_files(folder):
        yield from Tail(path).read()


class Tail:
    """Reads the complete lines appended to one log file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        self.offset += end
        records = []
        for line in data[:end].splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: an unreadable line skipped", self.path)
        return records
