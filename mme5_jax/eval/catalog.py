"""What the benchmarks are: MMEB's 36 subsets (meta-task, in- or out-of-distribution), XTD's 7 languages, and the
published numbers a trained model is compared against.

Subset names are the directory names of the Hugging Face dataset repositories, so a local download is read as is.
"""
from dataclasses import dataclass

META_TASKS = ("classification", "vqa", "retrieval", "grounding")
META_TASK_HEADERS = {"classification": "Class.", "vqa": "VQA", "retrieval": "Retr.", "grounding": "Ground."}


@dataclass(frozen=True)
class Subset:
    name: str
    meta_task: str
    split: str  # "ind" (MMEB-train has it) or "ood"


def _subsets(meta_task, ind, ood):
    return [Subset(n, meta_task, "ind") for n in ind] + [Subset(n, meta_task, "ood") for n in ood]


MMEB_SUBSETS = {s.name: s for s in (
    _subsets("classification", ["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397"],
             ["Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"])
    + _subsets("vqa", ["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W"],
               ["ScienceQA", "VizWiz", "GQA", "TextVQA"])
    + _subsets("retrieval", ["VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
                             "NIGHTS", "WebQA"], ["OVEN", "FashionIQ", "EDIS", "Wiki-SS-NQ"])
    + _subsets("grounding", ["MSCOCO"], ["Visual7W-Pointing", "RefCOCO", "RefCOCO-Matching"])
)}

XTD_LANGUAGES = ("it", "es", "ru", "zh", "pl", "tr", "ko")  # the paper's column order
XTD_KS = (1, 5, 10)

# Percentages, as printed in the mmE5 paper (Tables 1 and 3).
MMEB_PUBLISHED = {
    "mmE5 zero-shot (560K synthetic)": {"classification": 60.6, "vqa": 55.7, "retrieval": 54.7, "grounding": 72.4,
                                        "ind": None, "ood": None, "overall": 58.6},
    "mmE5 supervised": {"classification": 67.6, "vqa": 62.8, "retrieval": 70.9, "grounding": 89.7,
                        "ind": 72.3, "ood": 66.7, "overall": 69.8},
    "VLM2Vec (LLaVA-1.6)": {"classification": 61.2, "vqa": 49.9, "retrieval": 67.4, "grounding": 86.1,
                            "ind": 67.5, "ood": 57.1, "overall": 62.9},
}
XTD_PUBLISHED_R10 = {
    "mmE5": {"it": 96.1, "es": 96.2, "ru": 93.3, "zh": 96.3, "pl": 95.4, "tr": 93.6, "ko": 96.0, "average": 95.3},
    "GME": {"average": 94.1},
    "jina-clip-v2": {"average": 92.3},
}
