"""The Grain pipeline's settings (`mme5_jax.data.pipeline` runs them), without JAX or Grain, so that the training
config's `data:` section takes its keys' defaults from here and validates before JAX starts."""
import dataclasses

from mme5_jax.processing import length_buckets

POLICIES = ("skip", "raise")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """`global_batch_size` counts examples over all processes; each process builds its 1/process_count share.

    `read_threads`/`read_buffer_size` bound the read-ahead in each process (main or worker); a buffered
    example holds the float32 tiles of its images (up to (2 + k) x max_image_tiles of them).

    `image_count_multiple`: a batch's images are packed per device and GradCache chunk, their count per device
    rounded up to this multiple, so that batches of similar content share one compiled step (each new count
    compiles the step again; padding images cost vision work).

    `bad_input="skip"` drops an example with an unusable record, text or image and counts it by reason;
    `"raise"` stops with an error naming the record. A bad *negative* is dropped from its list either way
    (counted), as long as `drop_bad_negatives`; the list is then padded by repeating its last entry.
    """

    processor_dir: str
    global_batch_size: int
    num_negatives: int = 3
    max_length: int = 256
    length_buckets: tuple = (32, 64, 128, 256)
    bos: str = "processor"
    seed: int = 0
    num_epochs: int | None = 1
    num_workers: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 2
    read_buffer_size: int = 8
    bad_input: str = "skip"
    drop_bad_negatives: bool = True
    max_text_chars: int = 20000
    max_image_pixels: int | None = None
    image_count_multiple: int = 4

    def buckets(self):
        """Sorted bucket lengths, capped by and ending with `max_length`."""
        return length_buckets(self.max_length, self.length_buckets)
