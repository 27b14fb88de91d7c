"""MMEB and XTD evaluation: readers for local dataset copies, cached embedding inference, the benchmark metrics,
reports, the `mme5 eval` command, and the hook the training loop calls (`evaluate_sets`, `set_from_records`)."""
from mme5_jax.eval.harness import evaluate_mmeb, evaluate_sets, evaluate_xtd
from mme5_jax.eval.readers import EvalSet, set_from_items, set_from_records

__all__ = ["EvalSet", "evaluate_mmeb", "evaluate_sets", "evaluate_xtd", "set_from_items", "set_from_records"]
