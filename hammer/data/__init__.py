"""Data pipeline: sources -> `prepare` (token shards + index) -> `load_prepared` -> mixed, seeded batches.

Nothing here imports jax or torch; the trainers receive numpy arrays of token ids.
"""
from hammer.data.loader import Loader, LoaderState, Mixture, eval_batches, mixture_from_specs, validation_sets
from hammer.data.prepare import pack, prepare
from hammer.data.prepared import PreparedDataset, load_prepared
from hammer.data.sources import DataError, Source, open_source

__all__ = ["DataError", "Loader", "LoaderState", "Mixture", "PreparedDataset", "Source", "eval_batches",
           "load_prepared", "mixture_from_specs", "open_source", "pack", "prepare", "validation_sets"]
