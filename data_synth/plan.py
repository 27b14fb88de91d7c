"""The plan: a deterministic list of unique sample specs, each with a stable content-hash id.

Counts per task, modality and language are allocated exactly (largest remainder), so a plan of any size
matches the configured ratios to within one sample; only the pairing of those slots is random (seeded).
The id hashes the spec's content, so a rerun of the same command finds its finished samples by id.
"""
import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from data_synth.prompts import PROMPT_VERSION, TASK_GUIDE


@dataclass(frozen=True)
class SampleSpec:
    id: str
    task: str
    modality: str
    language: str
    anchor: str
    qry_image: str | None
    pos_image: str | None
    neg_image: str | None

    @property
    def query_side(self):
        return self.modality.split("->")[0]

    @property
    def target_side(self):
        return self.modality.split("->")[1]

    def to_json(self):
        return asdict(self)


def allocate(total, weights):
    """Split `total` into integer counts proportional to `weights` (largest remainder; ties by order)."""
    weights = np.asarray(weights, dtype=np.float64)
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:remainder]:
        counts[i] += 1
    return counts.tolist()


def task_modalities(tasks):
    """[(task, modality, weight)]: a task's share is split evenly over its modality combinations."""
    for task, t in tasks.items():
        for modality in t["modalities"]:
            if (task, modality) not in TASK_GUIDE:
                known = ", ".join(m for k, m in TASK_GUIDE if k == task) or "none"
                raise ValueError(f"tasks.{task}.modalities: {modality!r} has no prompt for task {task!r} "
                                 f"(it supports: {known})")
    total = sum(t["share"] for t in tasks.values())
    return [(task, modality, t["share"] / total / len(t["modalities"]))
            for task, t in tasks.items() for modality in t["modalities"]]


def _spec_id(task, modality, language, anchor, qry_image, pos_image, neg_image):
    content = json.dumps([PROMPT_VERSION, task, modality, language, anchor, qry_image, pos_image, neg_image])
    return hashlib.sha256(content.encode()).hexdigest()[:20]


def _images_for(modality, anchor, pool, negative_rank):
    """(qry_image, pos_image, neg_image) for a spec anchored on pool image index `anchor`.

    A text-only sample (T->T) carries no image: its anchor only inspires the texts in the prompt.
    """
    query_side, target_side = modality.split("->")
    if "I" not in query_side + target_side:
        return None, None, None
    neighbours = pool.neighbours[anchor]
    if "I" not in target_side:
        return pool.paths[anchor], None, None
    if "I" not in query_side:
        return None, pool.paths[anchor], pool.paths[neighbours[0]]
    rank = min(negative_rank, len(neighbours) - 1)
    if rank < 1:
        raise ValueError(f"modality {modality} needs a positive and a different hard negative: "
                         f"the image pool needs at least 3 distinct images")
    return pool.paths[anchor], pool.paths[neighbours[0]], pool.paths[neighbours[rank]]


def make_plan(num_samples, pool, languages, tasks, seed=0, negative_rank=4):
    """Return `num_samples` unique SampleSpecs; the same arguments always give the same plan."""
    rng = np.random.default_rng(seed)
    combos = task_modalities(tasks)
    combo_slots = np.repeat(np.arange(len(combos)), allocate(num_samples, [w for *_, w in combos]))
    codes = list(languages)
    language_slots = np.repeat(np.arange(len(codes)), allocate(num_samples, [languages[c]["weight"] for c in codes]))
    rng.shuffle(combo_slots)
    rng.shuffle(language_slots)
    anchors = rng.permutation(len(pool.paths))
    busiest = max(Counter(zip(combo_slots.tolist(), language_slots.tolist())).values())
    if busiest > len(anchors):
        raise ValueError(f"--num-samples {num_samples} needs {busiest} specs of one task, modality and language "
                         f"but the pool has {len(anchors)} distinct images; add images or lower --num-samples")
    used, specs, cursor = set(), [], 0
    for combo, lang in zip(combo_slots.tolist(), language_slots.tolist()):
        task, modality, _ = combos[combo]
        while (combo, lang, int(anchors[cursor % len(anchors)])) in used:
            cursor += 1
        anchor = int(anchors[cursor % len(anchors)])
        cursor += 1
        used.add((combo, lang, anchor))
        images = _images_for(modality, anchor, pool, negative_rank)
        language = codes[lang]
        specs.append(SampleSpec(_spec_id(task, modality, language, pool.paths[anchor], *images),
                                task, modality, language, pool.paths[anchor], *images))
    return specs


def plan_digest(specs):
    """One hash for the whole plan, stored with a run so a rerun can tell it is the same run."""
    return hashlib.sha256("\n".join(s.id for s in specs).encode()).hexdigest()[:16]
