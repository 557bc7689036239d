"""Feature extraction fanned out over shards of the image list, then collected into one store.

The pipeline's ``plan_shards`` step lists the shard indices, one ``extract_features_shard`` task
per index runs in parallel (``dsl.ParallelFor``), and ``collect_features`` merges their stores
(``dsl.Collected``) into the one artifact train and evaluate read. Every shard reads and fills the
same content-addressed feature cache, so images extracted by an earlier run, or by another shard,
are not extracted again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from captioner.errors import CaptionerError, DataError
from captioner.features.extract import FLIP_SUFFIX, FeatureStore


def check_shards(count: int) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise CaptionerError(f"extract_shards {count!r}: must be a whole number >= 1", field="extract_shards")
    return count


def shard_indices(count: int) -> list[int]:
    return list(range(check_shards(count)))


def shard_images(images: Sequence[str], index: int, count: int) -> list[str]:
    """Shard ``index`` of ``count``: a contiguous block (neighbouring files stay on one machine),
    sizes differing by at most one, every image in exactly one shard."""
    check_shards(count)
    if not 0 <= index < count:
        raise CaptionerError(f"shard index {index} is outside 0..{count - 1}", field="shard_index")
    size, extra = divmod(len(images), count)
    start = index * size + min(index, extra)
    return list(images[start:start + size + (1 if index < extra else 0)])


def expected_names(images: Sequence[str], flipped: Sequence[str]) -> list[str]:
    """What a complete feature artifact holds: every image, and the mirrored copy of ``flipped``."""
    return [*images, *(name + FLIP_SUFFIX for name in flipped)]


def collect_stores(parts: Sequence[Path | str], dest: Path | str, expected: Sequence[str],
                   shard_size: int = 2048) -> FeatureStore:
    """Merge the shard stores ``parts`` (keyed by image name) into one store at ``dest``.

    Refuses, naming the shard, a part that is not a feature store, parts whose features came from
    different set-ups, and a merge that lacks any of ``expected`` (a shard that lost images must
    not yield a smaller training set without anybody noticing). Names already in ``dest`` are
    kept, so a killed collect resumes.
    """
    set_up = None
    for number, part in enumerate(parts):
        folder = Path(part)
        if not (folder / "index.json").is_file() and not (folder / "backbone.json").is_file():
            raise DataError(f"shard {number} holds no feature store", path=str(folder))
        backbone = folder / "backbone.json"
        recorded = backbone.read_text() if backbone.is_file() else None
        if set_up is not None and recorded is not None and recorded != set_up:
            raise DataError(f"shard {number} was extracted with another backbone set-up than shard 0",
                            path=str(backbone))
        set_up = set_up or recorded
    out = FeatureStore(Path(dest))
    for part in parts:
        store = FeatureStore(Path(part))
        if store.index:
            store.export(list(store.index), out.folder, shard_size)
    out.folder.mkdir(parents=True, exist_ok=True)
    out.reload()
    missing = out.missing(expected)
    if missing:
        raise DataError(f"the {len(parts)} shard(s) lack {len(missing)} image(s), e.g. {missing[:3]}",
                        path=str(out.folder))
    return out
