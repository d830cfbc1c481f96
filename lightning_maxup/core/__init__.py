"""The MaxUp step as tensor functions, its options and its batch-tree helpers; no Lightning imports."""
