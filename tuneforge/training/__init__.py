"""Training recipes: job spec and local paths in, artifacts out. Imports neither the API nor the
database; importing this package does not import torch."""
