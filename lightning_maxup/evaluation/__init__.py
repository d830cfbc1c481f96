"""Worst-of-k accuracy and selection fidelity: each metric beside the callback that logs it."""
