"""Per-model-family glue: where the hooks go. An adapter never decides which tokens survive."""

from vtoken.adapters import llava, qwen_vl, video_dit, vit  # noqa: F401  (registration side effects)
