"""Evaluation of a frozen backbone: features extracted once, then kNN and a linear probe on them."""
