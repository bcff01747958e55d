"""Verified downloads for `harness data get` and named backbones: mirrors, resume, checksums, pins.

pooch does the fetching: its ``retrieve`` streams into a temporary file, checks the hash and only
then moves the file into place. It cannot resume (each attempt starts a fresh temporary file), so
:class:`ResumingDownloader` is the one piece of our own: a pooch downloader that keeps the bytes in
``<file>.part`` and asks the server for the rest with an HTTP ``Range`` request.

A checksum is ``ALG:HEX`` (md5, sha1, sha256). A hex shorter than the algorithm's digest is a
published prefix (torchvision's file names carry the first 8 hex of the sha256; MoCo and MAE
publish md5 prefixes) and is compared as such. Every downloaded file is also pinned: its sha256 is
written to ``pins.json`` in the cache on first download, and a later file of another sha256 is an
error.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from harness.errors import HarnessError, one_line
from harness.files import write_json_atomic

CACHE_ENV = "HARNESS_CACHE"
DIGEST_LEN = {"md5": 32, "sha1": 40, "sha256": 64}


def cache_dir() -> Path:
    """$HARNESS_CACHE, else the user's cache folder (e.g. ~/.cache/harness)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    import pooch

    return Path(pooch.os_cache("harness"))


def parse_checksum(text: str | None) -> tuple[str, str] | None:
    """``"md5:a04e12f8"`` -> ("md5", "a04e12f8"); None stays None."""
    if not text:
        return None
    alg, _, value = str(text).partition(":")
    value = value.lower()
    if alg not in DIGEST_LEN or not value or len(value) > DIGEST_LEN[alg] or any(c not in "0123456789abcdef" for c in value):
        raise HarnessError(f"bad checksum {text!r}: use md5:HEX, sha1:HEX or sha256:HEX (a prefix is allowed)")
    return alg, value


def file_hash(path: Path, alg: str = "sha256") -> str:
    import pooch

    return pooch.file_hash(str(path), alg=alg)


def checksum_problem(path: Path, checksum: str | None) -> str | None:
    """None when ``path`` matches ``checksum`` (a full digest or a published prefix), else why not."""
    parsed = parse_checksum(checksum)
    if parsed is None:
        return None
    alg, want = parsed
    got = file_hash(path, alg)
    if not got.startswith(want):
        kind = "prefix " if len(want) < DIGEST_LEN[alg] else ""
        return f"{alg} {got[:len(want)]} differs from the published {alg} {kind}{want}"
    return None


# ----------------------------------------------------------------------------- pins
def _pins_path() -> Path:
    return cache_dir() / "pins.json"


def read_pins() -> dict:
    path = _pins_path()
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise HarnessError(f"{path}: not valid JSON; fix or remove it") from None


def check_pin(key: str, sha256: str) -> bool:
    """True when ``key`` was pinned before (and matches); pins it on first sight; a mismatch is an error."""
    pins = read_pins()
    pinned = pins.get(key)
    if pinned is None:
        pins[key] = sha256
        write_json_atomic(_pins_path(), pins, sort_keys=True)
        return False
    if pinned != sha256:
        raise HarnessError(f"{key}: sha256 {sha256} differs from the one pinned on first download ({pinned}, "
                           f"in {_pins_path()}); the file changed upstream or is corrupt")
    return True


# ----------------------------------------------------------------------------- downloading
class ResumingDownloader:
    """A pooch downloader that resumes ``part`` with an HTTP Range request and shows sizes."""

    def __init__(self, part: Path, progress: bool = True, timeout: float = 60.0):
        self.part, self.progress, self.timeout = Path(part), progress, timeout
        self.resumed_from = 0

    def __call__(self, url: str, output_file, pooch_obj=None) -> None:
        import requests
        from tqdm import tqdm

        have = self.part.stat().st_size if self.part.is_file() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout, allow_redirects=True) as r:
            if r.status_code == 416 and have:  # the part is already whole
                self.resumed_from = have
            else:
                r.raise_for_status()
                resume = have and r.status_code == 206
                self.resumed_from = have if resume else 0
                total = int(r.headers.get("Content-Length", 0)) + self.resumed_from or None
                with open(self.part, "ab" if resume else "wb") as f, tqdm(
                        total=total, initial=self.resumed_from, unit="B", unit_scale=True, unit_divisor=1024,
                        desc=self.part.name[:-5], disable=not self.progress, leave=False) as bar:
                    for chunk in r.iter_content(chunk_size=1 << 16):  # a cut loses at most one chunk
                        f.write(chunk)
                        bar.update(len(chunk))
                if total is not None and self.part.stat().st_size != total:
                    raise requests.exceptions.ConnectionError(
                        f"connection closed at {self.part.stat().st_size:,} of {total:,} bytes")
        os.replace(self.part, output_file)


def _one_line(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if response is not None:
        return f"HTTP {response.status_code} {response.reason}"
    text = one_line(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:197] + "..."


def fetch(name: str, urls: list[str], folder: Path, checksum: str | None = None, size: int | None = None,
          pin_key: str | None = None, progress: bool = True, log=print) -> Path:
    """``folder/name``, downloaded from the first of ``urls`` that gives a verified file.

    An existing file is verified and kept. A dead source is reported in one line and the next one
    is tried; a partial download (``name.part``) is resumed; a file of the wrong size or checksum
    is removed, named, and the next source tried. The sha256 is pinned under ``pin_key``.
    """
    import pooch
    import requests

    pooch.get_logger().setLevel("WARNING")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target, part = folder / name, folder / (name + ".part")
    parsed = parse_checksum(checksum)
    full = f"{parsed[0]}:{parsed[1]}" if parsed and len(parsed[1]) == DIGEST_LEN[parsed[0]] else None

    def problem(path: Path) -> str | None:
        if size is not None and path.stat().st_size != size:
            return f"wrong size: {path.stat().st_size:,} bytes instead of {size:,}"
        why = checksum_problem(path, checksum)
        return f"checksum mismatch: {why}" if why else None

    def verified(path: Path) -> Path:
        try:
            check_pin(pin_key or name, file_hash(path))
        except HarnessError as exc:
            path.unlink()
            raise HarnessError(f"{path} removed: {exc}") from None
        return path

    if target.is_file():
        why = problem(target)
        if why is None:
            return verified(target)
        target.unlink()
        log(f"{target}: {why}; removed, downloading again")
    tried = []
    for url in urls:
        for attempt in range(2):  # a resumed download that fails its checksum is retried once from the start
            downloader = ResumingDownloader(part, progress=progress)
            try:
                pooch.retrieve(url, known_hash=full, fname=name, path=folder, downloader=downloader)
            except requests.exceptions.RequestException as exc:
                log(f"{url}: {_one_line(exc)}; trying the next source" if url != urls[-1] else f"{url}: {_one_line(exc)}")
                tried.append(url)
                break
            except ValueError as exc:  # pooch: hash mismatch; it removed the file
                why = f"checksum mismatch: {_one_line(exc)}"
            else:
                why = problem(target)
                if why is None:
                    source_of(target).write_text(url + "\n")
                    return verified(target)
                target.unlink()
            part.unlink(missing_ok=True)
            if downloader.resumed_from and attempt == 0:
                log(f"{name} from {url} (resumed): {why}; removed, downloading from the start")
                continue
            log(f"{name} from {url}: {why}; removed")
            tried.append(url)
            break
    raise HarnessError(f"{name}: no source gave a verified file (tried {', '.join(tried) or 'none'})")


def source_of(path: Path) -> Path:
    """The file beside a download that holds the URL it came from."""
    return Path(str(path) + ".url")


def free_bytes(folder: Path) -> int:
    folder = Path(folder)
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free
