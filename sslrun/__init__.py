"""sslrun: a config-driven runner for self-supervised visual representation learning."""

import logging

# faiss's loader logs each SIMD build it fails to find (with a ModuleNotFoundError) at INFO, which Hydra's
# log configuration prints: a dozen alarming lines in every run that clusters. Warnings still show.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

__version__ = "0.1.0"
