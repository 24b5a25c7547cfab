"""The lmms-eval plugin (``--model vtoken``), the local task writer and the ``vtoken eval`` command."""
