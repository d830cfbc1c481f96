"""Datasets, data modules of plain data and the candidate copies made in DataLoader workers."""
