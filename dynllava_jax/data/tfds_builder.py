"""A LLaVA JSON + image folder packed into TFDS ArrayRecord shards, and read back.

Writing (``build_tfds`` or the CLI)::

    python -m dynllava_jax.data.tfds_builder --json llava_v1_5_mix665k.json \\
        --image-folder /data/llava --data-dir /data/tfds

produces ``<data-dir>/llava_instruct/1.0.0/llava_instruct-train.array_record-*`` with
one example per JSON record, in JSON order (shuffling happens in the grain pipeline):

==================  ===========================================================
``id``              text: the record's ``id`` (its index when absent)
``image_path``      text: the record's ``image``, ``""`` for a text-only sample
``has_image``       bool
``image_missing``   bool: the file could not be read when building (counted here,
                    and the record is skipped by the pipeline)
``image``           bytes: the image file's ENCODED bytes as stored on disk (never
                    decoded or re-encoded here); ``b""`` if text-only or missing
``conversations``   text: the record's ``conversations``, as a JSON string
==================  ===========================================================

Only plain bytes, strings and a bool are stored, so neither writing nor reading
needs TensorFlow (it is not a dependency; tfds runs in its TF-less mode and grain
reads the shards through ``tfds.data_source``). Records are not validated here
beyond the image file's existence: a corrupt image or a malformed conversation is
written as is and skipped by the same rule as in the JSON path, so both paths yield
identical batches. tfds writes into a temporary directory and renames it when
complete, so an interrupted build never leaves a half-written dataset.

The class is not put in the tfds registry (``skip_registration``): reading resolves
the name from the files under ``data_dir``, so readers need no import of this module
and ``python -m`` of this file cannot collide with an imported copy.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from tqdm import tqdm

from dynllava_jax.data.llava_json import JsonRecords, RawRecord

logger = logging.getLogger(__name__)

DEFAULT_NAME = "llava_instruct"
_READ_CHUNK = 256  # image files read ahead (by a thread pool) while writing


class TooManyMissingImages(ValueError):
    """Most image files are absent: almost always a wrong --image-folder."""


def _check_missing(missing: int, with_image: int, limit: float, folder, example) -> None:
    if with_image and missing / with_image > limit:
        raise TooManyMissingImages(
            f"{missing} of the {with_image} images read so far are missing under "
            f"--image-folder {folder} (e.g. {example}): is it the folder the JSON's image "
            f"paths are relative to? (--max-missing-images {limit:g} is the fraction allowed)")


class LlavaInstruct(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """LLaVA instruction data (``llava_v1_5_mix665k`` format): JSON records + encoded images."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Encoded image bytes + conversations as a JSON string."}

    # tfds 4.9.10 resolves the builder's source file through `importlib_resources`, a
    # package it requires only on Python < 3.9: give the path directly instead.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def __init__(self, *, json_path: str | os.PathLike | None = None,
                 image_folder: str | os.PathLike | None = None, num_threads: int = 16,
                 progress: bool = True, max_missing_images: float = 0.5, **kwargs):
        self._json_path = None if json_path is None else str(json_path)
        self._image_folder = None if image_folder is None else str(image_folder)
        self._num_threads = num_threads
        self._progress = progress
        self.num_written = 0
        self.num_missing_images = 0
        self.num_with_image = 0
        self._example = None  # the first missing image's path, for the error message
        self._max_missing = float(max_missing_images)
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="LLaVA instruction-tuning records with their encoded images.",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "image_path": tfds.features.Text(),
                "has_image": tfds.features.Scalar(dtype=np.bool_),
                "image_missing": tfds.features.Scalar(dtype=np.bool_),
                "image": tfds.features.Scalar(dtype=np.object_, doc="encoded image file bytes"),
                "conversations": tfds.features.Text(doc="the conversations, a JSON string"),
            }),
            supervised_keys=None,
            disable_shuffling=True,  # keep JSON order: the pipeline shuffles, seeded
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        if self._json_path is None:
            raise ValueError("LlavaInstruct needs json_path (and image_folder) to build")
        return {"train": self._generate_examples()}

    def _read_image(self, raw: RawRecord) -> bytes | None:
        """The image file's bytes; ``b""`` for a text-only record, None if unreadable."""
        if raw.image is None:
            return b""
        path = Path(self._image_folder or "") / raw.image
        try:
            return path.read_bytes()
        except OSError as e:
            if not isinstance(e, FileNotFoundError):
                logger.warning("record %s: cannot read %s: %s", raw.id, path, e)
            return None

    def _generate_examples(self) -> Iterator[tuple[int, dict]]:
        records = JsonRecords(self._json_path)
        bar = tqdm(total=len(records), desc="packing records", unit=" rec",
                   disable=not self._progress)
        with concurrent.futures.ThreadPoolExecutor(max(1, self._num_threads)) as pool:
            for start in range(0, len(records), _READ_CHUNK):
                raws = [records[i] for i in range(start, min(start + _READ_CHUNK, len(records)))]
                images = pool.map(self._read_image, raws)
                for i, (raw, image) in enumerate(zip(raws, images), start):
                    self.num_with_image += raw.image is not None
                    if image is None and self._example is None:
                        self._example = Path(self._image_folder or "") / raw.image
                    if image is None:
                        self.num_missing_images += 1
                        if self.num_missing_images <= 10:
                            logger.warning(
                                "record %s: image %s not found (kept, skipped when read)",
                                raw.id, Path(self._image_folder or "") / raw.image)
                    self.num_written += 1
                    bar.update(1)
                    bar.set_postfix(missing_images=self.num_missing_images, refresh=False)
                    yield i, {
                        "id": raw.id,
                        "image_path": raw.image or "",
                        "has_image": raw.image is not None,
                        "image_missing": image is None,
                        "image": image or b"",
                        "conversations": json.dumps(raw.conversations, ensure_ascii=False),
                    }
                # Refuse early (before packing 665k records for nothing), and at the end.
                try:
                    _check_missing(self.num_missing_images, self.num_with_image,
                                   self._max_missing, self._image_folder, self._example)
                except TooManyMissingImages:
                    bar.close()  # the error then starts a line of its own
                    raise
        bar.close()
        self.info.metadata.update({
            "source_json": self._json_path, "image_folder": self._image_folder,
            "num_records": self.num_written, "num_missing_images": self.num_missing_images})


def build_tfds(json_path: str | os.PathLike, image_folder: str | os.PathLike,
               data_dir: str | os.PathLike, *, overwrite: bool = False, num_threads: int = 16,
               progress: bool = True, max_missing_images: float = 0.5) -> Path:
    """Pack ``json_path`` + the images under ``image_folder`` into ArrayRecord shards.

    Returns the dataset directory ``data_dir/llava_instruct/1.0.0``. An existing
    complete dataset there is reused unless ``overwrite``. More than
    ``max_missing_images`` (a fraction) of the image files missing raises
    `TooManyMissingImages` and writes nothing; fewer are warned about.
    """
    if not 0.0 <= float(max_missing_images) <= 1.0:
        raise ValueError(f"--max-missing-images must be a fraction in [0, 1], not {max_missing_images}")
    json_path, image_folder = Path(json_path), Path(image_folder)
    if not json_path.is_file():
        raise FileNotFoundError(f"LLaVA JSON file not found: {json_path}")
    if not image_folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_folder}")
    builder = LlavaInstruct(json_path=json_path, image_folder=image_folder, data_dir=str(data_dir),
                            num_threads=num_threads, progress=progress,
                            max_missing_images=max_missing_images)
    out = Path(builder.data_dir)
    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    if not overwrite and (out / "dataset_info.json").is_file():
        logger.info("reusing the existing dataset %s (pass overwrite=True to rebuild)", out)
        return out
    tfds.display_progress_bar(False)  # our bar has a total; tfds' own ones do not
    try:
        with tempfile.TemporaryDirectory() as downloads:  # tfds wants one; nothing is downloaded
            builder.download_and_prepare(
                download_dir=downloads,
                download_config=tfds.download.DownloadConfig(download_mode=mode))
    except TooManyMissingImages:
        name_dir = Path(data_dir) / DEFAULT_NAME
        if name_dir.is_dir() and not any(name_dir.iterdir()):
            name_dir.rmdir()  # tfds removed its temporary files; leave no empty dataset
        raise
    finally:
        tfds.display_progress_bar(True)
    logger.info("wrote %d records (%d with a missing image) to %s",
                builder.num_written, builder.num_missing_images, out)
    if builder.num_missing_images:
        logger.warning("%d of the %d images (%.1f%%) are missing under %s: those records are "
                       "skipped when training", builder.num_missing_images,
                       builder.num_with_image,
                       100.0 * builder.num_missing_images / max(builder.num_with_image, 1),
                       image_folder)
    return out


class TfdsRecords(Sequence[RawRecord]):
    """The records of a built dataset as :class:`RawRecord` (random access, picklable).

    Reads through ``tfds.data_source`` (ArrayRecord), which needs no TensorFlow.
    """

    def __init__(self, data_dir: str | os.PathLike, name: str = DEFAULT_NAME, split: str = "train"):
        if not Path(data_dir, name).is_dir():
            raise FileNotFoundError(
                f"no TFDS dataset {name!r} under {data_dir}; build it with "
                "`python -m dynllava_jax.data.tfds_builder --json F --image-folder D "
                f"--data-dir {data_dir}`")
        self._source = tfds.data_source(name, data_dir=str(data_dir), split=split)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> RawRecord:  # type: ignore[override]
        ex = self._source[index]
        text = lambda b: b.decode("utf-8") if isinstance(b, bytes) else str(b)  # noqa: E731
        conversations = text(ex["conversations"])
        try:
            conversations = json.loads(conversations)
        except json.JSONDecodeError:
            pass  # left as a string: skipped as a bad conversation
        has_image = bool(ex["has_image"])
        return RawRecord(id=text(ex["id"]), conversations=conversations,
                         image=text(ex["image_path"]) if has_image else None,
                         image_bytes=bytes(ex["image"]) if has_image else None,
                         image_missing=bool(ex["image_missing"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dynllava_jax.data.tfds_builder",
        description="Pack a LLaVA instruction JSON and its images into TFDS ArrayRecord shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", required=True,
                        help="LLaVA JSON file (e.g. llava_v1_5_mix665k.json)")
    parser.add_argument("--image-folder", required=True,
                        help="folder the records' image paths are relative to")
    parser.add_argument("--data-dir", required=True, help="TFDS data directory to write into")
    parser.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")
    parser.add_argument("--threads", type=int, default=16, help="threads reading image files")
    parser.add_argument("--max-missing-images", type=float, default=0.5, metavar="FRACTION",
                        help="refuse (and write nothing) when more than this fraction of the "
                             "records' image files is missing: usually a wrong --image-folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = build_tfds(args.json, args.image_folder, args.data_dir, overwrite=args.overwrite,
                         num_threads=args.threads, max_missing_images=args.max_missing_images)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    meta_file = out / "metadata.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    print(f"{out}: {meta.get('num_records', '?')} records, "
          f"{meta.get('num_missing_images', '?')} with a missing image (skipped when read)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
