"""The model: what turns an image into an embedding, and why two embeddings are close.

The network and its presets (config, network), what runs it at inference (runtime: torch
or ONNX Runtime, and an imported ONNX encoder), and the similarity maps that explain a
pair (explain). Training (medsim.training) makes a network; search, the worker and the
service only run one. Nothing here imports training, search or a door.
"""
