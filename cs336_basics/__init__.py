"""cs336-basics: byte-level BPE, a from-scratch Transformer LM, and its training loop."""
