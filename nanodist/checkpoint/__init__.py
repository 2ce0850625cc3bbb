"""Checkpoints that any layout can write and any layout can resume from.

    format.py     the layout-free format, saved from and loaded into a `TrainState`
    integrity.py  the manifest of checksums and the safe reading of DCP's .metadata
    store.py      the run directory's checkpoints: which exist, which --resume means
"""
from nanodist.checkpoint.format import TrainState, load, load_model, save
from nanodist.checkpoint.store import UNVERIFIED, checkpoints, find, read_info, remove_debris, step_of

__all__ = ["UNVERIFIED", "TrainState", "save", "load", "load_model", "checkpoints", "find", "read_info",
           "remove_debris", "step_of"]
