"""The ops B'MOJO is built from, each with ``naive`` / ``torch`` / ``nki`` backends (DESIGN §4)."""

from bmojo.ops.attention import bmojo_attention
from bmojo.ops.eidetic_gather import eidetic_gather
from bmojo.ops.registry import default_backend, set_default_backend
from bmojo.ops.ssm_scan import ssm_scan

__all__ = ["bmojo_attention", "default_backend", "eidetic_gather", "set_default_backend", "ssm_scan"]
import bmojo.ops.nki  # noqa: F401  (registers the nki backends)
