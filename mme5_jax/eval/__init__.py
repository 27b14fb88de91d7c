"""MMEB and XTD evaluation: readers for local dataset copies, cached embedding inference, the benchmark metrics,
reports, the `mme5 eval` command, and what the trainer's held-out evaluation scores with (`set_from_records`,
`evaluate_sets`)."""
from mme5_jax.eval.harness import evaluate_mmeb, evaluate_sets, evaluate_xtd
from mme5_jax.eval.readers import EvalSet, set_from_items, set_from_records

__all__ = ["EvalSet", "evaluate_mmeb", "evaluate_sets", "evaluate_xtd", "set_from_items", "set_from_records"]
