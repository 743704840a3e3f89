"""A local stand-in for a Hub image dataset (ImageNet's schema): parquet shards in ``data/``, an ``image`` column and
a ``label`` ClassLabel with names, written with ``datasets`` so that ``load_dataset(folder)`` reads it as the Hub's."""

from pathlib import Path


def write_hub_layout(images: Path, root: Path, num_shards: int = 2) -> Path:
    """``images/<class>/<file>.png`` -> ``root/data/train-0000k-of-0000n.parquet`` (classes interleaved, bytes
    embedded). Returns ``root``, to pass as ``--dataset_name``."""
    from datasets import ClassLabel, Dataset, Features, Image

    names = sorted(folder.name for folder in images.iterdir())
    files = [sorted((images / name).glob("*.png")) for name in names]
    rows = {"image": [], "label": []}
    for position in range(max(len(f) for f in files)):
        for label, class_files in enumerate(files):
            if position < len(class_files):
                rows["image"].append({"bytes": class_files[position].read_bytes(), "path": None})
                rows["label"].append(label)
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    dataset = Dataset.from_dict(rows, features=features)
    (root / "data").mkdir(parents=True)
    for k in range(num_shards):
        shard = dataset.shard(num_shards, k, contiguous=True)
        shard.to_parquet(str(root / "data" / f"train-{k:05d}-of-{num_shards:05d}.parquet"))
    return root
