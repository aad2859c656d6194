"""Generators behind the `Policy` protocol: the embedded tiny DiT and diffusers adapters."""

from refrl.models.policy import Policy

__all__ = ["Policy"]
