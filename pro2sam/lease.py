"""One writer per output: the write lease, a small JSON object renewed by compare-and-swap.

The lease ``OUT/_pro2sam_lease.json`` holds the run id, host, pid and expiry of the run writing
``OUT``. Every change to it is conditional on the version this run last saw, so that two runs
can never both believe they hold it:

- S3: ``PutObject`` with ``If-None-Match: *`` creates it, ``PutObject``/``DeleteObject`` with
  ``If-Match: <ETag>`` renew and remove it; a read is a plain ``GetObject`` (no cached ETag).
- Local folders: created by an exclusive link, renewed by an atomic rename after the content was
  read back and found unchanged (a read-compare-rename, exact but for a window of microseconds).
- Other object stores (fsspec): the same read-compare-write, without a server-side condition.

The holder renews every ``ttl_s / 4`` (a heartbeat thread) and once more, synchronously, before
each commit (:meth:`WriterLease.check`), so a commit is made only by the run that holds the lease
at that moment, whatever the heartbeat did; a heartbeat that kept failing (an outage) is made
good by the next commit's renewal as long as no other run took the lease meanwhile.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import socket
import tempfile
import threading
import time

import fsspec.asyn

from .storage import StorageError, filesystem, is_remote, join_uri, new_file_mode

__all__ = ["LEASE_NAME", "OutputBusy", "LeaseLost", "WriterLease"]

log = logging.getLogger("pro2sam.output")

LEASE_NAME = "_pro2sam_lease.json"


class OutputBusy(StorageError):
    """Another run holds the output's lease."""


class LeaseLost(StorageError):
    """This run's lease was taken over (``--force``) or could not be renewed in time."""


class _Changed(Exception):
    """The lease is not at the version a conditional write expected."""


# ---------------------------------------------------------------- the lease object


class _LeaseFile:
    """Conditional access to one small file: each method takes and returns a *version* (an S3
    ETag, or the content itself), and a write is refused (:class:`_Changed`) unless the file is
    still at the version given."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.path = filesystem(uri)

    def read(self) -> tuple[bytes, str | bytes] | None:
        """(content, version), or None when there is no lease."""
        self.fs.invalidate_cache(self.path)
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, data

    def create(self, data: bytes) -> str | bytes:
        """Write ``data`` unless a lease exists (:class:`FileExistsError`)."""
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except TypeError:  # a store without exclusive writes: check, then write
            if self.fs.exists(self.path):
                raise FileExistsError(self.uri) from None
            self.fs.pipe_file(self.path, data)
        except OSError as e:
            if isinstance(e, FileExistsError) or _precondition_failed(e):
                raise FileExistsError(self.uri) from None
            raise
        return data

    def replace(self, data: bytes, version) -> str | bytes:
        self._expect(version)
        self.fs.pipe_file(self.path, data)
        return data

    def delete(self, version) -> None:
        self._expect(version)
        self.fs.rm(self.path)

    def _expect(self, version) -> None:
        seen = self.read()
        if seen is None or seen[1] != version:
            raise _Changed()


class _LocalLeaseFile(_LeaseFile):
    def read(self):
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except IsADirectoryError:
            raise StorageError(f"the output's lease {self.path} is a folder, not a lease; move it away, then run again") from None
        return data, data

    def create(self, data: bytes):
        folder, name = os.path.split(os.path.abspath(self.path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:  # FileExistsError here means a file where the folder should be
            what = "is a file, not a folder" if os.path.isfile(folder) else f"cannot be made: {type(e).__name__}: {e}"
            raise StorageError(f"cannot write to the output {folder}: it {what}") from None
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        try:
            os.fchmod(fd, new_file_mode())  # another user's run must be able to read whose output it is
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.link(tmp, self.path)  # fails if the lease exists: an atomic create
        finally:
            os.unlink(tmp)
        return data

    def replace(self, data: bytes, version):
        folder, name = os.path.split(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        try:
            os.fchmod(fd, new_file_mode(self.path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self._expect(version)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return data

    def delete(self, version) -> None:
        self._expect(version)
        os.unlink(self.path)


class _S3LeaseFile(_LeaseFile):
    """The lease on S3, through s3fs's request function (its retries, its credentials), with the
    server checking every condition."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.bucket, _, self.key = self.path.partition("/")

    def _call(self, method: str, **request):
        return fsspec.asyn.sync(self.fs.loop, self.fs._call_s3, method, Bucket=self.bucket, Key=self.key, **request)

    def read(self):
        async def get():
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        try:
            return fsspec.asyn.sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def create(self, data: bytes):
        try:
            return self._call("put_object", Body=data, IfNoneMatch="*")["ETag"]
        except OSError as e:
            if _precondition_failed(e):
                raise FileExistsError(self.uri) from None
            raise

    def replace(self, data: bytes, version):
        try:
            return self._call("put_object", Body=data, IfMatch=version)["ETag"]
        except (OSError, FileNotFoundError) as e:
            if isinstance(e, FileNotFoundError) or _precondition_failed(e):
                raise _Changed() from None
            raise

    def delete(self, version) -> None:
        try:
            self._call("delete_object", IfMatch=version)
        except (OSError, FileNotFoundError) as e:
            if isinstance(e, FileNotFoundError) or _precondition_failed(e):
                raise _Changed() from None
            raise


def _precondition_failed(e: BaseException | None) -> bool:
    """Whether S3 refused a conditional request (HTTP 412, or 409 for a conflicting one); s3fs
    keeps botocore's error as the cause or context of the OSError it raises."""
    while e is not None:
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if error.get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
        if "PreconditionFailed" in str(e) or "pre-conditions you specified did not hold" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _lease_file(uri: str) -> _LeaseFile:
    if not is_remote(uri):
        return _LocalLeaseFile(uri)
    fs, _ = filesystem(uri)
    return _S3LeaseFile(uri) if hasattr(fs, "_call_s3") else _LeaseFile(uri)


# ---------------------------------------------------------------- the lease


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriterLease:
    """The output's lease: held by one run at a time, renewed by a heartbeat and at each commit.

    Another run finds the lease and:

    - takes it over when it has expired, when its holder is a process of this host that is
      gone (a killed run), or when it cannot be read as a lease (with a warning naming it);
    - refuses at once when its holder is a live process of this host;
    - otherwise (a holder on another host: a driver pod that died?) waits up to one ``ttl_s``
      for it to expire, and refuses if the holder renews it meanwhile.

    ``force`` takes the lease whatever holds it; the run it is taken from stops before its next
    commit (:class:`LeaseLost`): its renewal there is refused.

    Args:
        output: the output the lease guards: its URI, or a :class:`~pro2sam.output.LabelsOutput`.
        run_id: this run's id, written into the lease.
        ttl_s: how long the lease lives without a renewal; renewed every ``ttl_s / 4``.
        force: take the lease whatever holds it.

    Attributes:
        displaced: the run id this run took a live lease from with ``force`` (None otherwise).
    """

    def __init__(self, output, run_id: str, *, ttl_s: float = 60.0, force: bool = False) -> None:
        if not ttl_s > 0:
            raise ValueError("the lease's ttl_s must be > 0")
        output_uri = getattr(output, "uri", output)
        self.output_uri = output_uri
        self.uri = join_uri(output_uri, LEASE_NAME)
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.force = force
        self.displaced: str | None = None
        self._file = _lease_file(self.uri)
        self._version = None
        self._valid_until = 0.0  # time.monotonic() until which the lease is ours for sure
        self._lost: str | None = None
        self._lock = threading.Lock()  # one write of the lease at a time: heartbeat or commit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading

    def _payload(self) -> bytes:
        return json.dumps(
            {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "expires": time.time() + self.ttl_s}
        ).encode()

    def _holder(self) -> tuple[dict | None, object]:
        """(the lease's content, its version): content None when there is no lease, {} when it
        cannot be read as one."""
        try:
            seen = self._file.read()
        except StorageError:
            raise
        except Exception as e:
            raise StorageError(f"cannot read the output's lease {self.uri}: {type(e).__name__}: {e}") from None
        if seen is None:
            return None, None
        data, version = seen
        try:
            holder = json.loads(data)
        except ValueError:
            holder = None
        expires = holder.get("expires") if isinstance(holder, dict) else None
        if not isinstance(expires, (int, float)) or isinstance(expires, bool) or not math.isfinite(expires):
            return {}, version
        return holder, version

    def _who(self, holder: dict) -> str:
        if not holder:
            return f"an unreadable lease ({self.uri})"
        return f"run {holder.get('run_id')} (host {holder.get('host')}, pid {holder.get('pid')})"

    # -- taking and giving back

    def acquire(self) -> None:
        """Take the lease (see the class) and start renewing it.

        Raises:
            OutputBusy: another run holds it.
            StorageError: the output cannot be written, or its lease is not a file.
        """
        seen_expires = None
        deadline = time.monotonic() + self.ttl_s + 5
        for attempt in itertools.count():
            if attempt > 100:  # a store that neither shows the lease nor lets it be created
                raise StorageError(f"cannot take the output's lease {self.uri}: it keeps changing or cannot be created")
            holder, version = self._holder()
            try:
                started = time.monotonic()
                if holder is None:
                    self._version = self._file.create(self._payload())
                    break
                if self.force:
                    self._version = self._file.replace(self._payload(), version)
                    if holder and holder.get("expires", 0) > time.time() and holder.get("run_id") != self.run_id:
                        self.displaced = str(holder.get("run_id"))
                    log.warning("--force: took the output's lease from %s", self._who(holder))
                    break
            except (FileExistsError, _Changed):
                continue  # another run was faster: look again
            except StorageError:
                raise
            except OSError as e:
                raise StorageError(f"cannot write to the output {self.output_uri}: {type(e).__name__}: {e}") from None
            who = self._who(holder)
            expires = holder.get("expires") if holder else None
            stale = expires is None or expires < time.time()
            if not stale and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
                if not _pid_alive(holder["pid"]):
                    stale = True
                else:
                    raise OutputBusy(self._busy(who))
            if stale:
                log.warning("taking over the output's lease from %s, which is gone", who)
                try:
                    self._version = self._file.replace(self._payload(), version)
                    break
                except _Changed:
                    continue
                except OSError as e:
                    raise StorageError(f"cannot write to the output {self.output_uri}: {type(e).__name__}: {e}") from None
            if (seen_expires is not None and expires > seen_expires) or time.monotonic() > deadline:
                raise OutputBusy(self._busy(who))
            if seen_expires is None:
                log.warning(
                    "the output %s is leased by %s until %s; waiting for it to expire (or be renewed)",
                    self.output_uri, who, time.strftime("%H:%M:%S", time.localtime(expires)),
                )  # fmt: skip
            seen_expires = expires
            time.sleep(min(2.0, max(0.1, expires - time.time() + 0.1)))
        self._valid_until = started + self.ttl_s
        self._lost = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="pro2sam-lease", daemon=True)
        self._thread.start()

    def _busy(self, who: str) -> str:
        return (
            f"the output {self.output_uri} is being written by {who}; two runs on one output would "
            "label images twice. Wait for it to finish, or pass --force if that run is dead"
        )

    def release(self) -> None:
        """Stop renewing and remove the lease if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            if self._lost or self._version is None:
                return
            try:
                try:
                    self._file.delete(self._version)
                except _Changed:
                    holder, version = self._holder()
                    if holder and holder.get("run_id") == self.run_id:  # ours, at a version we did not see
                        self._file.delete(version)
            except Exception as e:
                log.warning("could not remove the output's lease %s: %s: %s", self.uri, type(e).__name__, e)
            self._version = None

    def __enter__(self) -> WriterLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- keeping it

    def _renew(self) -> None:
        """Renew the lease at the version this run wrote last.

        Raises:
            _Changed: another run holds it now (``self._lost`` says which).
            Exception: storage failed (the lease may still be ours).
        """
        with self._lock:
            if self._lost:
                raise _Changed()
            started = time.monotonic()
            try:
                self._version = self._file.replace(self._payload(), self._version)
            except _Changed:
                holder, version = self._holder()
                if holder and holder.get("run_id") == self.run_id and holder.get("pid") == os.getpid():
                    # our own write whose answer was lost (a retried request): still ours
                    self._version = self._file.replace(self._payload(), version)
                else:
                    self._lost = (
                        f"the output's lease was taken over by {self._who(holder)}" if holder else "the output's lease was removed"
                    )
                    raise
            self._valid_until = started + self.ttl_s

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self._renew()
            except _Changed:
                log.warning("%s; this run stops before its next commit", self._lost)
                return
            except Exception as e:  # an outage: keep trying; a commit renews once more before it writes
                log.warning("could not renew the output's lease %s: %s: %s", self.uri, type(e).__name__, e)

    def check(self) -> None:
        """Renew the lease now, conditionally: return only if this run holds it.

        Raises:
            LeaseLost: another run took it (``--force``), or it could not be renewed before it expired.
        """
        try:
            self._renew()
            return
        except _Changed:
            raise LeaseLost(f"{self._lost}; this run stops (its committed rows stay)") from None
        except Exception as e:
            if time.monotonic() < self._valid_until:
                log.warning("could not renew the output's lease %s (%s: %s); it holds for %.0f s more",
                            self.uri, type(e).__name__, e, self._valid_until - time.monotonic())  # fmt: skip
                return
            raise LeaseLost(
                f"the output's lease {self.uri} could not be renewed in time ({type(e).__name__}: {e}); "
                "this run stops (its committed rows stay)"
            ) from None
