"""Adapters: the on-disk format (:mod:`lmadapt.adapters.format`) that lmadapt, PEFT and vLLM load."""
