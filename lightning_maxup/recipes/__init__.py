"""Ready-made models, data modules and fine-tuning helpers built on the library."""
