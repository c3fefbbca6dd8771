"""The run lock on an object store: a lease object (``run.lock``) instead of ``flock``, which a
bucket does not have. A trainer creates it only if it is absent, rewrites it every third of its time
to live while it runs (so a new version appears), and deletes it at the end. A killed trainer stops
rewriting: its lease is stale once ``ttl_s`` pass without a new version, and the next trainer takes
it over -- a lock nobody releases never blocks a resume for longer than that.

Whether a lease is stale is decided without any host's clock: a contender watches the object (its
version tag) for up to one time to live: a new version means a live holder (refused, naming it);
none means a dead one (taken over). On S3 the watch is cut short by the store's own clock (the
response's ``Date`` minus the object's ``LastModified``), and every write is conditional --
``If-None-Match: *`` to create, ``If-Match: <version>`` to refresh or take over -- so of two
contenders exactly one wins. Other stores (``gs://`` through fsspec) create conditionally
(``pipe_file(mode="create")``) but refresh, take over and delete unconditionally.
"""

from __future__ import annotations

import email.utils
import json
import sys
import threading
import time
import uuid
from typing import Any

from train.store import RunPath, filesystem, scheme_of

# A refresh every third of the lease: two may fail (a slow PUT, retries) before it goes stale.
REFRESHES_PER_TTL = 3
# HTTP's Date and Last-Modified headers count whole seconds: an age read from them can be up to
# this much too high, so a lease is judged by its age less this.
HTTP_DATE_RESOLUTION_S = 1.0


class ObjectLease:
    """The lease ``path`` held by this process (``acquire``, then ``release``)."""

    def __init__(self, path: RunPath, ttl_s: float, holder: dict[str, Any]):
        self.path, self.ttl_s = path, ttl_s
        self.fs, self.key = filesystem(path)
        self.s3 = scheme_of(path) == "s3"
        self.owner = uuid.uuid4().hex
        self.holder = {**holder, "owner": self.owner, "ttl_s": ttl_s}
        self.version: str | None = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def acquire(self) -> str:
        """Takes the lease (waiting at most one time to live for a holder's next refresh); returns
        ``""``, or the problem in one line when a live trainer holds it."""
        for _ in range(3):  # a lost race with another contender: look again
            seen = self._current()
            if seen is not None and (problem := self._wait_out(*seen)):
                return problem
            self.version = self._put(if_match=seen[0] if seen else None)
            if self.version is not None:
                self.thread = threading.Thread(target=self._refresh_loop, name="meshlm-run-lease",
                                               daemon=True)
                self.thread.start()
                return ""
        return f"{self.path} is being taken by other trainers at the same moment; try again later"

    def _wait_out(self, version: str, age_s: float | None, body: dict) -> str:
        """Watches a held lease: "" once it is stale, the problem once its holder refreshes it."""
        who = _describe(body)
        deadline = time.monotonic() + self.ttl_s - (age_s or 0.0)
        if time.monotonic() < deadline:
            print(f"meshlm: {self.path} is locked by {who}; waiting up to "
                  f"{deadline - time.monotonic():.0f} s for it to refresh its lease (run.lock_ttl) "
                  "or go stale", file=sys.stderr, flush=True)
        while time.monotonic() < deadline:
            time.sleep(min(self.ttl_s / (2 * REFRESHES_PER_TTL), max(deadline - time.monotonic(), 0)))
            seen = self._current()
            if seen is None:
                return ""
            if seen[0] != version:
                return (f"{self.path} is in use by another trainer ({who}, which refreshes its "
                        "lease); wait for it to end or choose another run.dir")
            if seen[1] is not None and seen[1] >= self.ttl_s:
                break
        print(f"warning: taking over the stale lock of {who}: not refreshed for {self.ttl_s:g} s "
              "(run.lock_ttl)", file=sys.stderr, flush=True)
        return ""

    def release(self) -> None:
        """Stops refreshing and deletes the lease if it is still this process's."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        seen = self._current()
        if seen is not None and seen[2].get("owner") == self.owner:
            try:
                if self.s3:  # only the version just read: a taker-over's lease stays
                    bucket, key = self.key.split("/", 1)
                    self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=seen[0])
                else:
                    self.fs.rm(self.key)
            except OSError:
                pass  # taken over meanwhile (or a store without conditional deletes: it goes stale)

    def _refresh_loop(self) -> None:
        while not self.stop.wait(self.ttl_s / REFRESHES_PER_TTL):
            try:
                version = self._put(if_match=self.version)
            except OSError as e:  # a failed PUT: the next one may succeed before the lease expires
                print(f"warning: could not refresh the lock {self.path}: {e}", file=sys.stderr,
                      flush=True)
                continue
            if version is None:
                print(f"warning: the lock {self.path} was taken over by another trainer (this one "
                      f"did not refresh it for {self.ttl_s:g} s); two trainers now write this run",
                      file=sys.stderr, flush=True)
                return
            self.version = version

    # ------------------------------------------------------------------------- store operations

    def _body(self) -> bytes:
        return json.dumps({**self.holder, "written": time.time()}).encode()

    def _put(self, if_match: str | None) -> str | None:
        """Writes the lease if it is absent (``if_match`` None) or still at version ``if_match``;
        the new version, or None when the condition failed."""
        if self.s3:
            bucket, key = self.key.split("/", 1)
            condition = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
            try:
                return self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(),
                                       **condition)["ETag"]
            except FileExistsError:  # created by another since it was read
                return None
            except FileNotFoundError:  # gone since it was read; or there is no such bucket
                if if_match:
                    return None
                raise
            except OSError as e:  # S3's 412 Precondition Failed (409 in a race) is a plain OSError
                if any(word in str(e) for word in ("pre-condition", "Precondition", "onflict")):
                    return None
                raise
        try:
            self.fs.pipe_file(self.key, self._body(), mode="overwrite" if if_match else "create")
        except FileExistsError:
            return None
        return str(self.fs.info(self.key).get("etag") or time.time())

    def _current(self) -> tuple[str, float | None, dict] | None:
        """(version, age in seconds by the store's clock or None, contents) of the lease, or None
        when there is none."""
        try:
            if self.s3:
                bucket, key = self.key.split("/", 1)
                head = self.fs.call_s3("head_object", Bucket=bucket, Key=key)
                date = head["ResponseMetadata"]["HTTPHeaders"].get("date")
                age = (max((email.utils.parsedate_to_datetime(date) - head["LastModified"])
                           .total_seconds() - HTTP_DATE_RESOLUTION_S, 0.0) if date else None)
                return head["ETag"], age, _parse(self.fs.cat_file(self.key))
            self.fs.invalidate_cache(self.key)
            info = self.fs.info(self.key)
            return str(info.get("etag") or info.get("mtime")), None, _parse(self.fs.cat_file(self.key))
        except FileNotFoundError:
            return None


def _parse(body: Any) -> dict:
    try:
        data = json.loads(body)
        return data if isinstance(data, dict) else {}
    except (ValueError, TypeError):
        return {}


def _describe(body: dict) -> str:
    if "pid" in body and "host" in body:
        return f"pid {body['pid']} on {body['host']}"
    return "a holder its lock file does not name"
