"""Training and evaluating the bundled "shapes" model: never imported by the worker or the engine.

- ``shapes_data``: the procedural, captioned images (and the palette reader that scores them).
- ``tokenizer``: the word-level tokenizer of the shapes vocabulary, saved with the model.
- ``architecture``: the presets of the text encoder, VAE, UNet and scheduler trained from scratch.
- ``train``: ``python -m diffq.model.training.train {vae,decoder,unet,lora,export}``.
- ``evaluate``: ``python -m diffq.model.training.evaluate``: prompt adherence of a model (or a LoRA adapter).

The runtime (``diffq.model.engine`` and what it imports, the ``worker`` package) loads a trained model
folder with diffusers and needs nothing from here; tests/test_boundaries.py checks that a worker
loading a model and running jobs never imports this package.
"""
