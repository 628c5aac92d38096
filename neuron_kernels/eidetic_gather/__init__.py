"""NKI kernels of ``eidetic_gather`` (DESIGN §2.4): indirect-DMA row gather and its backward."""
