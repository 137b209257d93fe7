"""A synthetic sign-language corpus for the offline demo.

Sentences come from a small grammar, ``SUBJECT VERB OBJECT [COLOUR] [PLACE/TIME]``, with a parallel
French rendering (so the demo decoder can show SONAR's multilingual output). Each sentence is
"signed" as a gloss sequence (``CAT EAT APPLE RED HOME``): every gloss has a prototype feature
vector, held for a random number of frames with noise, so a clip is a ``(T, 768)`` array like a
SignHiera feature file. The validation and test sentences never occur in the training split, so a
model must compose words it has seen in other sentences.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np

# (English, French, gloss). Glosses are the "signs"; articles and agreement are not signed.
SUBJECTS = [
    ("the cat", "le chat", ["CAT"]),
    ("the dog", "le chien", ["DOG"]),
    ("the girl", "la fille", ["GIRL"]),
    ("the boy", "le garçon", ["BOY"]),
    ("my mother", "ma mère", ["MY", "MOTHER"]),
    ("my father", "mon père", ["MY", "FATHER"]),
    ("the teacher", "le professeur", ["TEACHER"]),
    ("the doctor", "le médecin", ["DOCTOR"]),
    ("my friend", "mon ami", ["MY", "FRIEND"]),
    ("the baby", "le bébé", ["BABY"]),
]
VERBS = [
    ("eats", "mange", ["EAT"]),
    ("sees", "voit", ["SEE"]),
    ("likes", "aime", ["LIKE"]),
    ("wants", "veut", ["WANT"]),
    ("buys", "achète", ["BUY"]),
    ("finds", "trouve", ["FIND"]),
    ("draws", "dessine", ["DRAW"]),
    ("takes", "prend", ["TAKE"]),
]
OBJECTS = [
    ("the apple", "la pomme", ["APPLE"]),
    ("the bread", "le pain", ["BREAD"]),
    ("a book", "un livre", ["BOOK"]),
    ("the ball", "le ballon", ["BALL"]),
    ("a fish", "un poisson", ["FISH"]),
    ("the car", "la voiture", ["CAR"]),
    ("a flower", "une fleur", ["FLOWER"]),
    ("the hat", "le chapeau", ["HAT"]),
    ("a cake", "un gâteau", ["CAKE"]),
    ("the box", "la boîte", ["BOX"]),
]
# Colours that do not change with gender in French, placed after the noun in both glosses and French.
COLOURS = [
    (None, None, []),
    ("red", "rouge", ["RED"]),
    ("yellow", "jaune", ["YELLOW"]),
    ("pink", "rose", ["PINK"]),
    ("orange", "orange", ["ORANGE"]),
]
PLACES = [
    (None, None, []),
    ("at home", "à la maison", ["HOME"]),
    ("in the park", "dans le parc", ["PARK"]),
    ("today", "aujourd'hui", ["TODAY"]),
    ("every morning", "chaque matin", ["MORNING", "EVERY"]),
    ("at school", "à l'école", ["SCHOOL"]),
]


@dataclass(frozen=True)
class DemoSentence:
    """One sentence of the demo grammar: English text, French text and its gloss sequence."""

    en: str
    fr: str
    glosses: tuple[str, ...]


def _compose(subj, verb, obj, colour, place) -> DemoSentence:
    en_obj, fr_obj = obj[0], obj[1]
    if colour[0]:
        # English puts the colour before the noun ("the red ball"), French after ("le ballon rouge").
        article, noun = en_obj.split(" ", 1)
        en_obj, fr_obj = f"{article} {colour[0]} {noun}", f"{fr_obj} {colour[1]}"
    en = f"{subj[0]} {verb[0]} {en_obj}"
    fr = f"{subj[1]} {verb[1]} {fr_obj}"
    if place[0]:
        en, fr = f"{en} {place[0]}", f"{fr} {place[1]}"
    glosses = tuple(subj[2] + verb[2] + obj[2] + colour[2] + place[2])
    return DemoSentence(en=en[0].upper() + en[1:] + ".", fr=fr[0].upper() + fr[1:] + ".", glosses=glosses)


def all_sentences() -> list[DemoSentence]:
    """Every sentence of the grammar (24,000), in a fixed order."""
    return [_compose(*parts) for parts in itertools.product(SUBJECTS, VERBS, OBJECTS, COLOURS, PLACES)]


def all_glosses() -> list[str]:
    """The sign vocabulary, sorted."""
    words = {g for group in (SUBJECTS, VERBS, OBJECTS, COLOURS, PLACES) for *_, gl in group for g in gl}
    return sorted(words)


def split_sentences(n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, list[DemoSentence]]:
    """Disjoint train / val / test samples of the grammar (no sentence is in two splits)."""
    sentences = all_sentences()
    rng = random.Random(seed)
    rng.shuffle(sentences)
    if n_train + n_val + n_test > len(sentences):
        raise ValueError("the grammar has fewer sentences than requested")
    return {
        "train": sentences[:n_train],
        "val": sentences[n_train : n_train + n_val],
        "test": sentences[n_train + n_val : n_train + n_val + n_test],
    }


def source_sentences(n_train: int, n_val: int, n_test: int, n_source: int, seed: int) -> list[DemoSentence]:
    """``n_source`` sentences of the same grammar that are in none of :func:`split_sentences`' splits."""
    sentences = all_sentences()
    random.Random(seed).shuffle(sentences)
    start = n_train + n_val + n_test
    if start + n_source > len(sentences):
        raise ValueError("the grammar has fewer sentences than requested")
    return sentences[start : start + n_source]


def shifted_prototypes(prototypes: dict[str, np.ndarray], shift: float, seed: int) -> dict[str, np.ndarray]:
    """Other signers' prototypes: ``sqrt(1 - shift^2) * p + shift * q`` with a fresh random ``q`` per gloss.

    ``shift`` 0 gives the same signs, 1 unrelated ones; in between, what a model learnt on one
    domain partly carries over to the other (cosine similarity about ``sqrt(1 - shift^2)``).
    """
    rng = np.random.default_rng(seed)
    keep = float(np.sqrt(1.0 - shift**2))
    return {g: (keep * p + shift * rng.standard_normal(p.shape[0])).astype(np.float32) for g, p in prototypes.items()}


def gloss_prototypes(feature_dim: int, seed: int) -> dict[str, np.ndarray]:
    """One fixed random feature vector per gloss: the 'appearance' of that sign."""
    rng = np.random.default_rng(seed)
    return {g: rng.standard_normal(feature_dim).astype(np.float32) for g in all_glosses()}


def sign_features(
    sentence: DemoSentence,
    prototypes: dict[str, np.ndarray],
    rng: np.random.Generator,
    *,
    min_frames: int = 3,
    max_frames: int = 7,
    noise: float = 0.5,
) -> np.ndarray:
    """A ``(T, D)`` clip: each gloss's prototype held for 3-7 frames, with Gaussian noise."""
    segments = []
    for gloss in sentence.glosses:
        frames = int(rng.integers(min_frames, max_frames + 1))
        proto = prototypes[gloss]
        segments.append(proto[None, :] + noise * rng.standard_normal((frames, proto.shape[0])).astype(np.float32))
    return np.concatenate(segments, axis=0)
