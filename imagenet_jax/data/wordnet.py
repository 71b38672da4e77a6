"""ImageNet's classes in the WordNet 3.0 noun hierarchy: names, glosses, ancestors.

ImageNet's class ids are WordNet 3.0 noun synset offsets: `n02084071` is "dog". The
package ships `wordnet.tsv` (made by scripts/make_wordnet_data.py from Princeton's
WordNet 3.0 database, licence notice in its header): the 1,000 ImageNet-1k classes and
all their ancestors, each with one parent (its first hypernym), so the classes form a
tree rooted at "entity". Nothing is downloaded at run time.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DATA_FILE = Path(__file__).with_name("wordnet.tsv")


@dataclasses.dataclass(frozen=True)
class Synset:
    wnid: str
    parent: str        # '' for the root
    is_class: bool     # one of ImageNet-1k's 1,000 classes
    lemmas: tuple[str, ...]
    gloss: str

    @property
    def name(self) -> str:
        """The first lemma: 'tench', 'dog'."""
        return self.lemmas[0]


class Hierarchy:
    """The tree of `wordnet.tsv`: names, paths to the root, lowest common ancestors."""

    def __init__(self, synsets: dict[str, Synset]):
        self.synsets = synsets

    def __contains__(self, wnid: str) -> bool:
        return wnid in self.synsets

    def name(self, wnid: str) -> str:
        """The synset's first lemma, or `wnid` itself for an id outside the hierarchy."""
        synset = self.synsets.get(wnid)
        return synset.name if synset else wnid

    def path(self, wnid: str) -> list[str]:
        """From `wnid` up to the root, both included."""
        path = [wnid]
        while parent := self.synsets[path[-1]].parent:
            path.append(parent)
        return path

    def depth(self, wnid: str) -> int:
        """Edges from the root ('entity' has depth 0)."""
        return len(self.path(wnid)) - 1

    def lowest_common_ancestor(self, a: str, b: str) -> str:
        ancestors_of_a = set(self.path(a))
        return next(node for node in self.path(b) if node in ancestors_of_a)

    def lca_height(self, a: str, b: str) -> int:
        """How far above the deeper of `a` and `b` their lowest common ancestor is: 0 when
        a == b, 1 for siblings, and so on up to the root.

        This is the "height of the lowest common ancestor" of Bertinetto et al., "Making
        Better Mistakes" (CVPR 2020), for a tree whose leaves need not all lie at the same
        depth (in one that is balanced, it is the ancestor's height above the leaves).
        """
        lca = self.lowest_common_ancestor(a, b)
        return max(self.depth(a), self.depth(b)) - self.depth(lca)

    def lca_heights(self, wnids: Sequence[str]) -> np.ndarray | None:
        """[n, n] int32 matrix of `lca_height` between the given classes, or None unless
        every one of them is in the hierarchy (class ids that are not wnids)."""
        if not all(wnid in self.synsets for wnid in wnids):
            return None
        paths = [self.path(w)[::-1] for w in wnids]  # root first
        ids = {node: i for i, node in enumerate({n for path in paths for n in path})}
        longest = max(len(path) for path in paths)
        # Row i: the ids of class i's path from the root, padded with -1 - i (unequal to
        # every other row's padding), so the common prefix of two rows is their common path.
        rows = np.asarray([[ids[n] for n in path] + [-1 - i] * (longest - len(path))
                           for i, path in enumerate(paths)], np.int64)
        common = np.cumprod(rows[:, None, :] == rows[None, :, :], axis=-1).sum(-1)
        depth = np.asarray([len(path) - 1 for path in paths])
        heights = np.maximum(depth[:, None], depth[None, :]) - (common - 1)
        np.fill_diagonal(heights, 0)  # (a row's padding matches itself)
        return heights.astype(np.int32)


@functools.cache
def load() -> Hierarchy:
    """The shipped hierarchy (read once per process)."""
    synsets = {}
    for line in DATA_FILE.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line:
            continue
        wnid, parent, is_class, lemmas, gloss = line.split("\t")
        synsets[wnid] = Synset(wnid, parent, is_class == "1", tuple(lemmas.split(", ")), gloss)
    return Hierarchy(synsets)


def class_name(wnid: str) -> str:
    """A person's name for class `wnid` ('tench'); the id itself when it is not a wnid."""
    return load().name(wnid)
