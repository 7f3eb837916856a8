"""memkv-mesh: a shared KV-cache (context memory) mesh for LLM inference.

The public surface is listed here; everything else is private to its module.
"""

from memkv_mesh import keys
from memkv_mesh.client import AsyncClient, Client, Lease, MemkvError
from memkv_mesh.keys import block_keys, namespace

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "Lease",
    "MemkvError",
    "__version__",
    "block_keys",
    "keys",
    "namespace",
]
