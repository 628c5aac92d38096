"""NKI kernels for Trainium and the NumPy interpreter that runs them on CPU (DESIGN §4)."""
