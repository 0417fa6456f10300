"""Byte Latent Transformer (Pagnoni et al., 2024) at CPU scale: bytes, an entropy model, patching,
hash n-gram embeddings, the BLT model and a plain byte transformer baseline.  See docs/blt.md."""
