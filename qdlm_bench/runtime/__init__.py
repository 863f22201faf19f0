"""Real low-bit inference (``runtime=real``): ``real`` holds the kernels' modules and the conversion."""
