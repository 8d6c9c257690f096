"""The on-disk synthetic dataset: generated once, shared by every later stage and run.

Layout of a dataset directory::

    dataset.json           manifest: format version, teacher fingerprint, input spec, generation
                           parameters, and one entry (file, count, sha256) per finished shard
    shard-00000.safetensors  ``images`` (uint8 N×3×H×W) and, for classifiers, ``labels`` (int64 N)
    preview.png            a grid of the first images, for a person to look at

Shards are written atomically and the manifest is rewritten after each one, so an interrupted
run leaves a valid dataset of its finished shards, and the next run continues from there.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dfbf_cli import __version__
from dfbf_cli.errors import DfbfError
from dfbf_cli.files import atomic_path, read_json, sha256_file, write_json

FORMAT = "dfbf-synthetic"
FORMAT_VERSION = 1
MANIFEST = "dataset.json"
PREVIEW = "preview.png"
PREVIEW_IMAGES = 16
SHARD_NAME = re.compile(r"shard-\d{5}\.safetensors")
REQUIRED = {"teacher": dict, "input_spec": dict, "imgsz": int, "generation": dict, "shards": list}


@dataclass
class SyntheticDataset:
    """A dataset directory and its manifest (a plain dict, exactly what is in ``dataset.json``)."""

    root: Path
    manifest: dict
    verified: bool = False  # every shard checked against the manifest in this process

    @property
    def num_images(self) -> int:
        return sum(shard["count"] for shard in self.manifest["shards"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["teacher"]["fingerprint"]

    @property
    def imgsz(self) -> int:
        return int(self.manifest["imgsz"])

    # -- writing ---------------------------------------------------------------------------

    @classmethod
    def create_or_resume(cls, root: Path, *, teacher: dict, input_spec: dict, imgsz: int, generation: dict) -> SyntheticDataset:
        """Open ``root`` to add shards: new if empty, resumed if it holds the same generation settings."""
        if (root / MANIFEST).exists():
            dataset = cls.open(root)
            if dataset.fingerprint != teacher["fingerprint"]:
                raise DfbfError(f"{root} holds a dataset synthesised from {dataset.manifest['teacher'].get('name')}, another model; use another --out.")
            previous = dataset.manifest["generation"]
            if previous != generation or dataset.imgsz != imgsz:
                changed = sorted(k for k in {*previous, *generation} if previous.get(k) != generation.get(k))
                changed += ["imgsz"] if dataset.imgsz != imgsz else []
                raise DfbfError(
                    f"{root} holds a dataset generated with other settings ({', '.join(changed)} differ); "
                    "use another --out, or the same settings to continue it."
                )
            dataset.adopt_finished()
            dataset.verify()
            return dataset
        if root.exists() and any(root.iterdir()):
            raise DfbfError(f"{root} exists and is not a dfbf synthetic dataset; choose an empty or new --out.")
        root.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dfbf_version": __version__,
            "teacher": teacher, "input_spec": input_spec, "imgsz": imgsz, "generation": generation, "shards": [],
        }
        dataset = cls(root, manifest, verified=True)
        dataset._write_manifest()
        return dataset

    def add_shard(self, images: torch.Tensor, labels: torch.Tensor | None, stats: dict, *, index: int | None = None) -> None:
        """Write shard ``index`` (uint8 N×3×H×W images; default: the next) atomically, then record it: in the
        manifest when it is the next one, else in a sidecar ``shard-N.json`` that :meth:`adopt_finished`
        moves into the manifest once the shards before it exist (several processes fill one dataset)."""
        index = len(self.manifest["shards"]) if index is None else index
        name = f"shard-{index:05d}.safetensors"
        tensors = {"images": images.contiguous()}
        if labels is not None:
            tensors["labels"] = labels.to(torch.int64).contiguous()
        with atomic_path(self.root / name) as tmp:
            save_file(tensors, str(tmp))
        entry = {"file": name, "count": len(images), "sha256": sha256_file(self.root / name), **stats}
        sidecar = self.root / name.replace(".safetensors", ".json")
        if index != len(self.manifest["shards"]):
            write_json(sidecar, entry)
            return
        self._record([entry])
        sidecar.unlink(missing_ok=True)  # a stale record of an earlier, interrupted attempt

    def adopt_finished(self) -> None:
        """Record, in order, the shards other processes finished (their sidecars), as far as they are contiguous."""
        adopted, sidecars = [], []
        while (sidecar := self.root / f"shard-{len(self.manifest['shards']) + len(adopted):05d}.json").is_file():
            entry = read_json(sidecar, "a finished shard's record")
            shard = self.root / str(entry.get("file", "")) if isinstance(entry, dict) else None
            if shard is None or not SHARD_NAME.fullmatch(shard.name) or not shard.is_file() or sha256_file(shard) != entry.get("sha256"):
                break  # damaged: that shard is made again
            adopted.append(entry)
            sidecars.append(sidecar)
        if adopted:
            self._record(adopted)
        for sidecar in sidecars:
            sidecar.unlink()

    def _record(self, entries: list[dict]) -> None:
        before = self.num_images
        self.manifest["shards"] += entries
        self._write_manifest()
        if before < PREVIEW_IMAGES:
            self._write_preview()

    def _write_manifest(self) -> None:
        self.manifest["num_images"] = self.num_images
        write_json(self.root / MANIFEST, self.manifest)

    def _write_preview(self) -> None:
        from torchvision.utils import save_image

        first = torch.cat([shard["images"] for shard in self.shards(verify=False)])[:PREVIEW_IMAGES]
        with atomic_path(self.root / PREVIEW) as tmp:
            save_image(first.float() / 255, str(tmp), nrow=4, padding=2, format="png")

    # -- reading ---------------------------------------------------------------------------

    @classmethod
    def open(cls, root: Path) -> SyntheticDataset:
        """Read and check the manifest as a whole (not the shards' contents: :meth:`verify` does that)."""
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise DfbfError(f"{root} is not a dfbf synthetic dataset (no {MANIFEST}); create one with 'dfbf synthesize'.")
        manifest = read_json(path, "the dataset's manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            found = manifest if not isinstance(manifest, dict) else f"{manifest.get('format')} v{manifest.get('format_version')}"
            raise DfbfError(f"{path} is format {found}; this dfbf reads {FORMAT} v{FORMAT_VERSION}.")
        for key, kind in REQUIRED.items():
            if not isinstance(manifest.get(key), kind):
                raise DfbfError(f"{path} is damaged: '{key}' is missing or not a {kind.__name__}; regenerate the dataset.")
        if not isinstance(manifest["teacher"].get("fingerprint"), str) or manifest["imgsz"] < 1:
            raise DfbfError(f"{path} is damaged: the teacher's fingerprint or the image size is missing; regenerate the dataset.")
        for number, shard in enumerate(manifest["shards"]):
            if not isinstance(shard, dict) or not isinstance(shard.get("count"), int) or shard["count"] < 1 or not isinstance(shard.get("sha256"), str):
                raise DfbfError(f"{path} is damaged: shard entry {number} lacks a count or checksum; regenerate the dataset.")
            if not isinstance(shard.get("file"), str) or not SHARD_NAME.fullmatch(shard["file"]):
                raise DfbfError(f"{path} names a shard file {shard.get('file')!r} that is not a shard of this folder; the manifest is not to be trusted.")
        if manifest.get("num_images", sum(s["count"] for s in manifest["shards"])) != sum(s["count"] for s in manifest["shards"]):
            raise DfbfError(f"{path} is damaged: its image count disagrees with its shards; regenerate the dataset.")
        return cls(Path(root), manifest)

    def content_id(self) -> str:
        """Identifies what the dataset holds (its shards' checksums): a fine-tuning run resumes only on the same images."""
        return hashlib.sha256("".join(shard["sha256"] for shard in self.manifest["shards"]).encode()).hexdigest()

    def check_teacher(self, fingerprint: str, *, allow_mismatch: bool, override: str | None = "--allow-teacher-mismatch",
                      lineage: str | None = None) -> None:
        """Refuse a dataset dreamt up by another model (than ``fingerprint``, or the original ``lineage`` it was
        pruned from), unless the user explicitly allows it (with ``override``)."""
        if self.fingerprint not in (fingerprint, lineage) and not allow_mismatch:
            made_by = self.manifest["teacher"].get("name", "another model")
            advice = f"pass {override} to use it anyway" if override else "synthesise a dataset from this model"
            raise DfbfError(f"{self.root} was synthesised from {made_by} (fingerprint {self.fingerprint[:12]}…), not from this "
                            f"model ({fingerprint[:12]}…); {advice}.")

    def verify(self) -> None:
        """Check every shard against the manifest: present, same checksum, images of the recorded count,
        dtype and size (labels likewise); name the first one that is not."""
        with_labels = set()
        for shard in self.manifest["shards"]:
            path = self.root / shard["file"]
            if not path.is_file():
                raise DfbfError(f"Shard {path} is listed in {MANIFEST} but missing.")
            if sha256_file(path) != shard["sha256"]:
                raise DfbfError(f"Shard {path} is corrupt or truncated (checksum mismatch); delete the dataset or regenerate it.")
            expected = {"images": ([shard["count"], 3, self.imgsz, self.imgsz], "U8"), "labels": ([shard["count"]], "I64")}
            try:
                with safe_open(str(path), framework="pt") as handle:
                    keys = set(handle.keys())
                    found = {k: (handle.get_slice(k).get_shape(), handle.get_slice(k).get_dtype()) for k in keys}
            except (SafetensorError, OSError) as error:
                raise DfbfError(f"Shard {path} cannot be read: {error}.") from error
            if "images" not in keys or not keys <= expected.keys() or any(found[k] != expected[k] for k in keys):
                raise DfbfError(f"Shard {path} does not hold what {MANIFEST} says ({shard['count']} uint8 images of 3×{self.imgsz}×{self.imgsz}); "
                                "the dataset is not to be trusted: regenerate it.")
            with_labels.add("labels" in keys)
        if len(with_labels) > 1:
            raise DfbfError(f"{self.root}: some shards have labels and others not; regenerate the dataset.")
        self.verified = True

    def shards(self, *, verify: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Each shard's tensors (``images`` and maybe ``labels``), the dataset verified first (once)."""
        if verify and not self.verified:
            self.verify()
        for shard in self.manifest["shards"]:
            path = self.root / shard["file"]
            try:
                yield load_file(str(path))
            except (SafetensorError, OSError) as error:
                raise DfbfError(f"Shard {path} cannot be read: {error}.") from error

    def probe(self, count: int) -> torch.Tensor:
        """The first ``count`` images as floats in [0, 1]: a small batch to score model edits on."""
        images = []
        for shard in self.shards():
            images.append(shard["images"])
            if sum(len(i) for i in images) >= count:
                break
        if not images:
            raise DfbfError(f"{self.root} holds no images yet; run 'dfbf synthesize' to fill it.")
        return torch.cat(images)[:count].float() / 255

    def load(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All images (uint8 N×3×H×W) and labels (or None), verified."""
        shards = list(self.shards())
        if not shards:
            raise DfbfError(f"{self.root} holds no images yet; run 'dfbf synthesize' to fill it.")
        images = torch.cat([s["images"] for s in shards])
        labels = torch.cat([s["labels"] for s in shards]) if all("labels" in s for s in shards) else None
        return images, labels
