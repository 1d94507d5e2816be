"""Data: load a dataset into uint8 tensors, serve batches, make augmented views in batches."""
