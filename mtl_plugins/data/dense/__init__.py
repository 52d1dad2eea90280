"""Dense-prediction datasets from the public releases' on-disk layouts (registered recipe datasets
``nyud``, ``pascal_context``, ``taskonomy``, ``cityscapes``), their transforms and file readers."""
