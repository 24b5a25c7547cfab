"""What every VLM host shares: the patch of one model instance (``host``), the prompt's column algebra
(``columns``), the cache's layout (``cache``), in-LLM pruning (``decoder``) and its sparse decode FFNs (``ffn``),
and the stats (``stats``)."""
