"""Per-model-family glue: where the hooks go. An adapter never decides which tokens survive."""

from vtoken.adapters import vit  # noqa: F401
