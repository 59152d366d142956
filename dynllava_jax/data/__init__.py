"""Training data: the LLaVA instruction format read through grain (see ``pipeline``).

``tfds_builder`` (TFDS ArrayRecord packing) is imported on demand, so that
``python -m dynllava_jax.data.tfds_builder`` and plain JSON training do not load it twice.
"""

from dynllava_jax.data.llava_json import EXAMPLE_KEYS, SKIP_REASONS, Invalid, JsonRecords, RawRecord
from dynllava_jax.data.pipeline import (DataError, LlavaBatchIterator, default_data_config,
                                        make_dataset, make_iterator)
from dynllava_jax.data.synthetic import write_synthetic_dataset

__all__ = ["EXAMPLE_KEYS", "SKIP_REASONS", "DataError", "Invalid", "JsonRecords",
           "LlavaBatchIterator", "RawRecord", "default_data_config", "make_dataset", "make_iterator",
           "write_synthetic_dataset"]
