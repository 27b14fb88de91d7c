"""Held-out recall@1 during training, scored by `mme5 eval`'s own path (`mme5_jax.eval`): the held-out records
become an `EvalSet` (`set_from_records`), the training state's model encodes it through an `Embedder` as
`mme5 eval` does, and `evaluate_sets` scores it, so the number a run logs is the number `mme5 eval` would give
its checkpoint, tie rule included."""
import functools
import itertools

import numpy as np
from flax import nnx

from mme5_jax.data.mixture import RecordSet
from mme5_jax.embedder import Embedder
from mme5_jax.eval.harness import evaluate_sets
from mme5_jax.eval.readers import set_from_records
from mme5_jax.processing import MllamaInputProcessor
from mme5_jax.records import read_records
from mme5_jax.train.config import TrainConfigError, processor_dir

SET_NAME = "heldout"


def heldout_set(record_dir, max_examples):
    """The first `max_examples` records as a retrieval set: each query against every record's positive, its own
    first, as in-batch negatives are in training (the records' hard negatives are left out)."""
    records = itertools.islice(read_records(record_dir), max_examples)
    return set_from_records(SET_NAME, records, RecordSet(record_dir).resolved_image_root(), hard_negatives=False)


def score(encode, eval_set):
    """recall@1 of `eval_set` as `evaluate_sets` scores it, with the queries scored and the distinct candidates."""
    scored = evaluate_sets(encode, [eval_set], ks=(1,))["sets"][eval_set.name]
    return {"recall@1": scored["recall@1"], "num_queries": scored["n"],
            "num_candidates": len(np.unique(eval_set.candidates))}


class HeldoutEval:
    """`evaluate(state)`: the held-out metrics of a training state's model (dropout off).

    Every process reads the same records and encodes every item (see `Embedder`), so all of them make the same
    compiled calls and get the same numbers.
    """

    def __init__(self, config, mesh, graphdef, record_dir):
        self.eval_set = heldout_set(record_dir, config.eval.max_examples)
        if not self.eval_set.num_rows:
            raise TrainConfigError(f"data.heldout: no usable record among the first {config.eval.max_examples} of "
                                   f"{record_dir} (skipped: {dict(self.eval_set.skipped)})")
        self.processor = MllamaInputProcessor.from_pretrained(processor_dir(config), bos=config.data.bos,
                                                              max_length=config.data.max_length)
        self.mesh, self.graphdef, self.batch_size = mesh, graphdef, config.eval.batch_size

    def __call__(self, state):
        model = nnx.merge(self.graphdef, state.trainable, state.frozen)
        embedder = Embedder(model, self.processor, batch_size=self.batch_size, mesh=self.mesh)
        return score(functools.partial(embedder.encode, progress=False), self.eval_set)
