"""NKI kernels of the chunked SSM scan ``ssm_scan`` (DESIGN §2.1, §4): forward and backward."""
