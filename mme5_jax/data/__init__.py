"""Training data: the released-data importer, the demo dataset and the Grain input pipeline."""
