"""Samples, manifests, importers and the embedded RefWorld generator."""

from refrl.data.schema import REFERENCE_TYPES, LoadedSample, Reference, RefSample

__all__ = ["REFERENCE_TYPES", "LoadedSample", "Reference", "RefSample"]
