"""sslrun: a config-driven runner for self-supervised visual representation learning."""

__version__ = "0.1.0"
