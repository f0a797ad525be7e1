"""The seeded, entity-level forget / held-out / retain split, balanced over relation families."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import NamedTuple

from retainfirst.benchmarks.facts.names import mentions
from retainfirst.benchmarks.facts.schema import Fact
from retainfirst.errors import RetainFirstError


def _family_targets(total: int, families: Sequence[str]) -> dict[str, int]:
    base, extra = divmod(total, len(families))
    return {name: base + (1 if i < extra else 0) for i, name in enumerate(families)}


def _pick_side(
    entities: Sequence[str],
    facts_of: dict[str, list[Fact]],
    family_order: Sequence[str],
    total: int,
    allowed: Callable[[Fact], bool],
    caps: dict[str, int] | None = None,
) -> list[Fact]:
    """Greedy, family-balanced choice of whole entities until ``total`` facts are taken.

    The family furthest below its share picks the next entity (in seeded order) that has an allowed
    fact of that family; the entity's other allowed facts join while their families are under share.
    ``caps`` bounds the facts taken per family (so a scarce family is left for the other side too).
    """
    targets = _family_targets(total, family_order)
    caps = caps or {}

    def capped(fact: Fact) -> bool:
        return counts[fact.family] >= caps.get(fact.family, total)

    counts: Counter[str] = Counter()
    used: set[str] = set()
    chosen: list[Fact] = []
    exhausted: set[str] = set()
    while len(chosen) < total:
        open_families = [f for f in family_order if f not in exhausted and counts[f] < caps.get(f, total)]
        if not open_families:
            break
        family = min(open_families, key=lambda f: (counts[f] / max(targets[f], 1), family_order.index(f)))
        entity = next(
            (
                e
                for e in entities
                if e not in used and any(f.family == family and allowed(f) for f in facts_of[e])
            ),
            None,
        )
        if entity is None:
            exhausted.add(family)
            continue
        used.add(entity)
        own = [f for f in facts_of[entity] if allowed(f)]
        first = next(f for f in own if f.family == family)
        for fact in [first] + [f for f in own if f is not first]:
            if len(chosen) >= total:
                break
            if fact is first or (counts[fact.family] < targets[fact.family] and not capped(fact)):
                chosen.append(fact)
                counts[fact.family] += 1
    return chosen


class FactSplit(NamedTuple):
    """The three disjoint sides of the known facts (see :func:`split_facts`)."""

    forget: list[Fact]
    retain: list[Fact]
    heldout: list[Fact]


def overlaps(fact: Fact, phrases: Sequence[str]) -> bool:
    """Whether the fact's subject or object names, or is named by, one of ``phrases``."""
    own = (fact.subject, fact.object)
    return any(mentions(p, o) or mentions(o, p) for p in phrases for o in own)


def split_facts(
    facts: Sequence[Fact], n_forget: int, n_retain: int, seed: int, n_heldout: int = 0
) -> FactSplit:
    """Seeded entity-level split into forget, held-out and retain (neighbour) facts.

    The three sides never share an entity (subject). Held-out and retain facts whose subject or
    object names, or is named by, a forget subject or answer are skipped, so no held-out or retain
    answer is a forget answer and the forget corpus never names them. A retain fact that names a
    held-out subject or answer (or is named by one) is skipped too, so the retain corpus never
    names a held-out entity or answer: held-out facts appear in no training corpus, and fitting the
    retain set does not rehearse a held-out answer ("German" for Germany and for Austria). Sides
    are picked in that order (forget, held-out, retain), each family-balanced; forget and held-out
    take at most a third of a family's known facts each, so every side covers every family it can.
    """
    if not facts:
        raise RetainFirstError(
            "the model answered none of the candidate facts correctly; the facts benchmark needs a model "
            "that knows some of them (e.g. smollm2-135m), or pass known_facts"
        )
    facts_of: dict[str, list[Fact]] = defaultdict(list)
    for fact in facts:
        facts_of[fact.subject].append(fact)
    sides = 2 + (n_heldout > 0)
    if len(facts_of) < sides:
        raise RetainFirstError(
            f"only {len(facts_of)} known entity; the split needs at least one forget, one retain"
            + (" and one held-out entity" if n_heldout > 0 else " entity")
        )
    entities = sorted(facts_of)
    random.Random(f"{seed}:split").shuffle(entities)
    family_order = list(dict.fromkeys(f.family for f in facts))
    available = Counter(f.family for f in facts)
    caps = {family: -(-count // sides) for family, count in available.items()}
    forget = _pick_side(entities, facts_of, family_order, n_forget, lambda f: True, caps)
    forget_subjects = {f.subject for f in forget}
    forget_phrases = [p for f in forget for p in (f.subject, f.object)]

    heldout: list[Fact] = []
    if n_heldout > 0:
        heldout = _pick_side(
            entities,
            facts_of,
            family_order,
            n_heldout,
            lambda f: f.subject not in forget_subjects and not overlaps(f, forget_phrases),
            caps,
        )
    taken = forget_subjects | {f.subject for f in heldout}
    heldout_phrases = sorted({p for f in heldout for p in (f.subject, f.object)})

    def retain_allowed(fact: Fact) -> bool:
        return (
            fact.subject not in taken
            and not overlaps(fact, forget_phrases)
            and not overlaps(fact, heldout_phrases)
        )

    retain = _pick_side(entities, facts_of, family_order, n_retain, retain_allowed)
    if not forget or not retain or (n_heldout > 0 and not heldout):
        raise RetainFirstError(
            f"the split left {len(forget)} forget, {len(retain)} retain and {len(heldout)} held-out facts; "
            "the model knows too few facts for the requested sizes: lower n_forget/n_retain/n_heldout"
        )
    return FactSplit(forget, retain, heldout)
