"""NKI kernels for Trainium and the NumPy interpreter that runs them on CPU (DESIGN §4).

- ``ssm_scan/``: chunked SSM scan, forward and backward (README.md there: derivation, tiling, cost).
- ``eidetic_gather/``: indirect-DMA gather of selected rows and its backward, which combines duplicate rows on
  TensorE before one scatter per row (README.md there).
- ``interpreter/``: NumPy stand-ins for ``nki``, ``nki.language``, ``nki.isa`` with hardware checks, instruction
  counts and a trn1 cost model; ``nki_compat`` picks them when the Neuron SDK is absent or
  ``BMOJO_NKI_INTERPRET=1``.

``bmojo.ops.nki`` registers the kernels as the ``nki`` backend of the ops.
"""
